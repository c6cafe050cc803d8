"""A tiny Megatron-Core GPT gives one rank's loss and gradients under every parallel layout."""

from __future__ import annotations

import pytest

from megatron_internvl.parallel.layout import ParallelLayout
from tests import gpt_cases
from tests.harness import run_on_ranks

GRAD_TOL = 1e-6  # float32; observed differences are ~1e-8
LOSS_TOL = 1e-6


def _assert_layouts_match(report: dict, layouts: list[ParallelLayout]) -> None:
    for layout in layouts:
        result = report[str(layout)]
        assert result["loss"] == pytest.approx(report["reference_loss"], abs=LOSS_TOL), layout
        worst = max(result["diffs"], key=result["diffs"].get)
        assert result["grad_diff"] < GRAD_TOL, f"{layout}: {worst} differs by {result['grad_diff']}"


def test_two_rank_layouts_match_one_rank(tmp_path):
    layouts = [
        ParallelLayout(tensor=2),
        ParallelLayout(tensor=2, sequence_parallel=True),
        ParallelLayout(pipeline=2),
        ParallelLayout(pipeline=2, virtual_pipeline=2),
        ParallelLayout(context=2),
    ]
    report = run_on_ranks(gpt_cases.layout_parity, 2, str(tmp_path), layouts)[0]
    _assert_layouts_match(report, layouts)


def test_four_rank_mixed_layouts_match_one_rank(tmp_path):
    layouts = [
        ParallelLayout(tensor=2, pipeline=2),
        ParallelLayout(tensor=2, context=2, sequence_parallel=True),
        ParallelLayout(pipeline=2, context=2, virtual_pipeline=2),
    ]
    report = run_on_ranks(gpt_cases.layout_parity, 4, str(tmp_path), layouts)[0]
    _assert_layouts_match(report, layouts)


def test_batched_p2p_is_wrong_on_gloo_so_the_platform_turns_it_off(tmp_path):
    """The reason for cpu_platform.adapt_model_config: interleaved PP with batched p2p on gloo."""
    vpp = ParallelLayout(pipeline=2, virtual_pipeline=2)
    report = run_on_ranks(gpt_cases.layout_parity, 2, str(tmp_path), [vpp], batch_p2p_comm=True)[0]
    assert report[str(vpp)]["grad_diff"] > 1e-3


def test_distributed_optimizer_step_matches_plain_optimizer(tmp_path):
    results = run_on_ranks(gpt_cases.distributed_optimizer_parity, 2, str(tmp_path))
    for result in results:
        assert result["loss"] == pytest.approx(result["reference_loss"], abs=LOSS_TOL)
        assert result["grad_norm"] == pytest.approx(result["reference_grad_norm"], rel=1e-6)
        # Clipping (clip_grad=0.05 < grad norm) and Adam ran: parameters moved, identically.
        assert result["reference_grad_norm"] > 0.05
        assert result["update_size"] > 1e-3
        assert result["param_diff"] < 1e-6


def test_checkpoint_saved_at_tp2_reloads_at_tp1(tmp_path):
    result = run_on_ranks(gpt_cases.checkpoint_reshard, 2, str(tmp_path))[0]
    assert result["vocab"] == gpt_cases.VOCAB
    assert result["logits_scale"] > 0.1
    assert result["logits_max_diff"] < 1e-5
    assert result["shards_compared"] > 10
    assert result["mismatched_shards"] == []
