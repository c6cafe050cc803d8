"""The training-step benchmark compares like with like: same parameter count, tokens and FLOPs."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks import train_step
from megatron_internvl.models.registry import get_spec
from megatron_internvl.training.flops import llm_forward_flops, training_flops


@pytest.mark.parametrize("flavour", ["tiny_qwen_300m_style", "tiny_internlm_6b_style"])
def test_internvl_step_against_transformers(flavour, capsys):
    args = ["--flavour", flavour, "--seq-length", "96", "--samples-per-row", "3"]
    args += ["--tiles-per-sample", "2", "--precision", "fp32", "--backend", "local"]
    results = train_step.main([*args, "--steps", "2", "--warmup", "1", "--microbatches", "2"])
    ours, theirs = results
    assert ours["model"] == "ours (local)" and theirs["model"] == "transformers (sdpa)"
    # Same model size: every tensor of transformers' InternVL has its counterpart in ours.
    assert ours["params"] == theirs["params"]
    spec = get_spec(flavour)
    flops = 2 * training_flops(spec, [32, 32, 32], tiles=6)
    assert ours["tflops"] == pytest.approx(flops / ours["step_s"] / 1e12)
    assert ours["tokens_s"] == pytest.approx(2 * 96 / ours["step_s"])
    assert ours["vs_baseline"] == pytest.approx(theirs["step_s"] / ours["step_s"])
    table = capsys.readouterr().out
    assert "ours/baseline" in table and f"{ours['vs_baseline']:.2f}x" in table
    # On a CPU each model's step splits into phases that cover it (one round: no medians mix).
    for row in (ours, theirs):
        assert list(row["phases_s"]) == ["forward", "backward", "optimizer"]
        assert all(seconds > 0 for seconds in row["phases_s"].values())
        assert sum(row["phases_s"].values()) == pytest.approx(row["step_s"], rel=0.05)
        assert f"{row['phases_s']['backward']:.3f}" in table.split("per phase")[1]


def test_llm_part_counts_only_the_language_model_over_interleaved_rounds():
    args = ["--flavour", "tiny_qwen_300m_style", "--part", "llm", "--llm-layers", "2"]
    args += ["--seq-length", "64", "--samples-per-row", "2", "--precision", "fp32"]
    args += ["--backend", "local", "--steps", "1", "--warmup", "1", "--rounds", "2"]
    ours, theirs = train_step.main(args)
    for row in (ours, theirs):  # rounds interleaved: a median and a best per model
        assert 0 < row["best_s"] <= row["step_s"]
    assert ours["vs_baseline_best"] == pytest.approx(theirs["best_s"] / ours["best_s"])
    spec = get_spec("tiny_qwen_300m_style")
    spec = dataclasses.replace(spec, language=dataclasses.replace(spec.language, num_layers=2))
    assert ours["params"] == theirs["params"]  # no ViT or projector on either side
    flops = 3 * llm_forward_flops(spec, [32, 32])
    assert ours["tflops"] == pytest.approx(flops / ours["step_s"] / 1e12)


def test_samples_that_cannot_hold_their_tiles_are_refused():
    with pytest.raises(SystemExit, match="do not fit samples"):
        train_step.main(
            [
                "--flavour",
                "tiny_qwen_300m_style",
                "--seq-length",
                "32",
                "--samples-per-row",
                "4",
                "--tiles-per-sample",
                "4",
                "--backend",
                "local",
            ]
        )
