"""A converted checkpoint gives transformers' logits: our model at TP=1, TP=2 and PP=2 on CPU ranks
within 1e-4 (float32), and transformers reloads our export with no missing or unexpected keys."""

from __future__ import annotations

import pytest
import torch
import transformers

from megatron_internvl.checkpoint.convert import hf_to_megatron, megatron_to_hf
from tests.convert_cases import FLAVOURS, make_native, megatron_logits, model_inputs
from tests.harness import run_on_ranks

TOLERANCE = 1e-4


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_logits_match_transformers_at_tp_and_pp(tmp_path, flavour):
    hf_model = make_native(flavour, tmp_path / "hf")
    inputs = model_inputs(flavour)
    with torch.no_grad():
        expected = hf_model(**inputs).logits
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", flavour, vision_pad_heads_to=2, log=print)

    ranks = run_on_ranks(megatron_logits, 2, str(tmp_path / "mg"), flavour, inputs)
    diffs = {
        "tp1-pp1-cp1": (ranks[0]["tp1-pp1-cp1"] - expected).abs().max().item(),
        "tp2-pp1-cp1": (ranks[0]["tp2-pp1-cp1"] - expected).abs().max().item(),
        "tp1-pp2-cp1": (ranks[1]["tp1-pp2-cp1"] - expected).abs().max().item(),
    }
    print(
        f"{flavour}: max |logit diff| vs transformers {diffs} "
        f"(logit scale {expected.abs().max():.3f})"
    )
    assert all(d <= TOLERANCE for d in diffs.values()), diffs

    # The way back: transformers loads our native export and computes the same logits.
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", log=print)
    reloaded, info = transformers.InternVLForConditionalGeneration.from_pretrained(
        tmp_path / "back", output_loading_info=True
    )
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, expected, rtol=0, atol=0)
