"""HF -> Megatron -> HF reproduces every tensor bit for bit in both layouts and both LLM
families."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_internvl.checkpoint.convert import hf_to_megatron, megatron_to_hf
from tests.convert_cases import FLAVOURS, load_dir, make_native, make_original


def _quiet(message: str) -> None:
    pass


def _assert_identical(expected: dict, got: dict) -> None:
    assert sorted(got) == sorted(expected), sorted(set(got) ^ set(expected))
    differing = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differing, differing


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_native_roundtrip_is_bit_exact(tmp_path, flavour):
    make_native(flavour, tmp_path / "hf")
    # Padded ViT heads (5 -> 6 for the 6B style) must vanish again on export.
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", flavour, vision_pad_heads_to=2, log=_quiet)
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", max_shard_bytes=60_000, log=_quiet)
    _assert_identical(load_dir(tmp_path / "hf"), load_dir(tmp_path / "back"))
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == ["InternVLForConditionalGeneration"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_original_roundtrip_is_bit_exact(tmp_path, flavour):
    original = make_original(flavour, tmp_path / "orig")
    hf_to_megatron(tmp_path / "orig", tmp_path / "mg", flavour, vision_pad_heads_to=4, log=_quiet)
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", hf_layout="original", log=_quiet)
    _assert_identical(original, load_dir(tmp_path / "back"))
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"]
    assert config["template"] == "internvl2_5" and config["ps_version"] == "v2"
