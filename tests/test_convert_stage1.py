"""A stage-1 import from a bare InternViT and a bare LLM keeps their weights, adds InternVL's 9
tokens as mean rows, takes the output layer from tied embeddings, and initialises the projector."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_internvl.checkpoint.convert import megatron_to_hf, pieces_to_megatron
from megatron_internvl.checkpoint.errors import ConversionError
from megatron_internvl.models.registry import get_spec
from tests.convert_cases import FLAVOURS, load_dir, original_shapes, save_shards

PADDING_ROWS = 5  # LLM checkpoints often pad the vocabulary past len(tokenizer)


def _quiet(message: str) -> None:
    pass


def _pieces(flavour, root, tied=False):
    spec = get_spec(flavour)
    gen = torch.Generator().manual_seed(0)
    full = {n: torch.randn(s, generator=gen) for n, s in original_shapes(spec).items()}
    vision = {
        n.removeprefix("vision_model."): t for n, t in full.items() if n.startswith("vision_model.")
    }
    llm = {
        n.removeprefix("language_model."): t
        for n, t in full.items()
        if n.startswith("language_model.")
    }
    old = spec.language.vocab_size - 9
    for name in [
        n
        for n in llm
        if n.endswith(
            ("embed_tokens.weight", "tok_embeddings.weight", "lm_head.weight", "output.weight")
        )
    ]:
        llm[name] = torch.randn(old + PADDING_ROWS, spec.language.hidden_size, generator=gen)
    if tied:
        llm.pop("lm_head.weight")
    save_shards(vision, root / "vit")
    save_shards(llm, root / "llm")
    arch = "Qwen2ForCausalLM" if spec.llm_family == "qwen2" else "InternLM2ForCausalLM"
    (root / "vit" / "config.json").write_text(json.dumps({"architectures": ["InternVisionModel"]}))
    (root / "llm" / "config.json").write_text(
        json.dumps({"architectures": [arch], "tie_word_embeddings": tied})
    )
    (root / "llm" / "tokenizer_config.json").write_text("{}")
    return full, vision, llm


@pytest.mark.parametrize("flavour,tied", [(FLAVOURS[0], True), (FLAVOURS[1], False)])
def test_stage1_import(tmp_path, flavour, tied):
    spec = get_spec(flavour)
    _, vision, llm = _pieces(flavour, tmp_path, tied)
    pieces_to_megatron(
        tmp_path / "vit",
        tmp_path / "llm",
        tmp_path / "mg",
        flavour,
        vision_pad_heads_to=2,
        log=_quiet,
    )
    megatron_to_hf(tmp_path / "mg", tmp_path / "out", hf_layout="original", log=_quiet)
    out = load_dir(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    for name, t in vision.items():
        assert torch.equal(out["vision_model." + name], t), name
    old = spec.language.vocab_size - 9
    embed = (
        "model.embed_tokens.weight" if spec.llm_family == "qwen2" else "model.tok_embeddings.weight"
    )
    head = "lm_head.weight" if spec.llm_family == "qwen2" else "output.weight"
    source_head = llm[embed] if tied else llm[head]
    for name, source in ((embed, llm[embed]), (head, source_head)):
        got = out["language_model." + name]
        assert got.shape == (spec.language.vocab_size, spec.language.hidden_size)
        assert torch.equal(got[:old], source[:old])  # padding rows dropped
        torch.testing.assert_close(got[old:], source[:old].mean(0).expand(9, -1), rtol=0, atol=1e-6)
    for name, t in llm.items():
        if name not in (embed, head):
            assert torch.equal(out["language_model." + name], t), name
    projector = [out[f"mlp1.{k}.weight"] for k in (1, 3)]
    assert all(p.abs().sum() > 0 and torch.isfinite(p).all() for p in projector)


def test_stage1_refuses_an_llm_of_the_other_family(tmp_path):
    _pieces(FLAVOURS[0], tmp_path)
    with pytest.raises(ConversionError, match="the checkpoint's LLM is qwen2"):
        pieces_to_megatron(
            tmp_path / "vit", tmp_path / "llm", tmp_path / "mg", FLAVOURS[1], log=_quiet
        )
    assert not (tmp_path / "mg").exists()
