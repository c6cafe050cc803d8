"""Bad inputs fail with errors that name the key or file and what was expected, and a failed or
refused conversion leaves no output directory behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_internvl.checkpoint import convert, hf_files, megatron_files
from megatron_internvl.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_internvl.checkpoint.errors import ConversionError
from tests.convert_cases import make_native

FLAVOUR = "tiny_qwen_300m_style"


def _quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "ckpt"
    make_native(FLAVOUR, out)
    return out


@pytest.fixture
def hf_copy(native_dir, tmp_path):
    out = tmp_path / "hf"
    shutil.copytree(native_dir, out)
    return out


def _edit(hf_dir, key, change):
    """Rewrite the shard holding `key` (file name spelling) with `change(tensors)` applied."""
    index_path = hf_dir / hf_files.INDEX_NAME
    index = json.loads(index_path.read_text())
    file = index["weight_map"][key]
    tensors = load_file(str(hf_dir / file))
    change(tensors)
    save_file(tensors, str(hf_dir / file), metadata={"format": "pt"})
    index["weight_map"] = {
        k: v for k, v in index["weight_map"].items() if v != file or k in tensors
    } | dict.fromkeys(tensors, file)
    index_path.write_text(json.dumps(index))
    return file


def _convert(hf_dir, out):
    return hf_to_megatron(hf_dir, out, FLAVOUR, log=_quiet)


def _no_leftovers(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_tensor_is_named(hf_copy, tmp_path):
    key = "language_model.model.layers.2.mlp.up_proj.weight"
    _edit(hf_copy, key, lambda t: t.pop(key))
    with pytest.raises(
        ConversionError,
        match=r"missing tensors:\s+model\.language_model\.layers\.2\.mlp\.up_proj\.weight",
    ):
        _convert(hf_copy, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_tensor_under_both_native_spellings_is_refused(hf_copy, tmp_path):
    # transformers writes `language_model.lm_head.weight` and reads it as `lm_head.weight`.
    key = "language_model.lm_head.weight"
    _edit(hf_copy, key, lambda t: t.update({"lm_head.weight": t[key].clone()}))
    with pytest.raises(ConversionError, match=r"given twice:\s+lm_head\.weight and language_model"):
        _convert(hf_copy, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_stray_tensor_is_unexpected(hf_copy, tmp_path):
    file = _edit(
        hf_copy,
        "language_model.lm_head.weight",
        lambda t: t.update({"vision_tower.extra.weight": torch.zeros(2)}),
    )
    with pytest.raises(
        ConversionError, match=rf"unexpected tensors.*\s+vision_tower\.extra\.weight \(in {file}\)"
    ):
        _convert(hf_copy, tmp_path / "out")


def test_wrong_shape_says_found_and_expected(hf_copy, tmp_path):
    key = "language_model.model.layers.0.self_attn.k_proj.weight"
    _edit(hf_copy, key, lambda t: t.update({key: torch.zeros(48, 64)}))
    with pytest.raises(
        ConversionError, match=r"k_proj\.weight \(in .*\): found \[48, 64\], expected \[32, 64\]"
    ):
        _convert(hf_copy, tmp_path / "out")


def test_wrong_flavour_is_reported_as_shape_mismatch(hf_copy, tmp_path):
    with pytest.raises(ConversionError, match="the checkpoint's LLM is qwen2"):
        hf_to_megatron(hf_copy, tmp_path / "out", "tiny_internlm_6b_style", log=_quiet)


def test_unknown_architecture(hf_copy, tmp_path):
    config = json.loads((hf_copy / "config.json").read_text())
    config["architectures"] = ["LlavaForConditionalGeneration"]
    (hf_copy / "config.json").write_text(json.dumps(config))
    expected = (
        r"unknown architecture \['LlavaForConditionalGeneration'\]; expected one of "
        r"\['InternVLChatModel', 'InternVLForConditionalGeneration'\]"
    )
    with pytest.raises(ConversionError, match=expected):
        _convert(hf_copy, tmp_path / "out")


def test_truncated_file_is_named(hf_copy, tmp_path):
    shard = sorted(hf_copy.glob("*.safetensors"))[3]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(
        ConversionError, match=rf"{shard.name}: cannot read it as safetensors .* truncated"
    ):
        _convert(hf_copy, tmp_path / "out")


def test_existing_output_refused_then_replaced_with_force(native_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(ConversionError, match=r"already exists; .* force=True"):
        _convert(native_dir, out)
    assert (out / "precious.txt").read_text() == "keep"
    hf_to_megatron(native_dir, out, FLAVOUR, force=True, log=_quiet)
    assert (out / "metadata.json").is_file() and not (out / "precious.txt").exists()
    with pytest.raises(ConversionError, match="already exists"):
        megatron_to_hf(out, out, log=_quiet)


def test_failure_midway_leaves_nothing(native_dir, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(convert, "_save_megatron", explode)
    with pytest.raises(OSError, match="simulated"):
        _convert(native_dir, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def _fail_after(calls: int, function):
    """`function`, raising on its `calls`-th call: a disk or read error half-way through."""
    count = [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            raise OSError("read error half-way (simulated)")
        return function(*args, **kwargs)

    return wrapped


def test_failure_half_way_through_streaming_leaves_nothing(native_dir, tmp_path, monkeypatch):
    _convert(native_dir, tmp_path / "mg")
    with monkeypatch.context() as patch:
        patch.setattr(hf_files.HFSource, "read", _fail_after(20, hf_files.HFSource.read))
        with pytest.raises(OSError, match="half-way"):
            _convert(native_dir, tmp_path / "out")
    _no_leftovers(tmp_path / "out")
    with monkeypatch.context() as patch:
        patch.setattr(megatron_files.Reader, "load", _fail_after(20, megatron_files.Reader.load))
        with pytest.raises(OSError, match="half-way"):
            megatron_to_hf(tmp_path / "mg", tmp_path / "back", max_shard_bytes=60_000, log=_quiet)
    _no_leftovers(tmp_path / "back")


def test_export_of_a_non_checkpoint_and_of_the_wrong_flavour(native_dir, tmp_path):
    with pytest.raises(ConversionError, match="not a Megatron dist checkpoint"):
        megatron_to_hf(native_dir, tmp_path / "x", FLAVOUR, log=_quiet)
    _convert(native_dir, tmp_path / "mg")
    with pytest.raises(ConversionError, match="does not hold flavour 'tiny_internlm_6b_style'"):
        megatron_to_hf(tmp_path / "mg", tmp_path / "y", "tiny_internlm_6b_style", log=_quiet)
    _no_leftovers(tmp_path / "y")
