"""The whole InternVL model gives one rank's loss and gradients under every parallel layout.

Both tiny flavours (300M-style ViT + Qwen2 LLM; 6B-style ViT with 5 heads, QK-norm and padded
heads + InternLM2 LLM), packed rows of three sub-samples with images, a text-only row, and
micro-batches of two unpacked rows.
"""

from __future__ import annotations

import pytest

from megatron_internvl.parallel.layout import ParallelLayout
from tests import internvl_cases
from tests.harness import run_on_ranks

FLAVOURS = ["tiny_qwen_300m_style", "tiny_internlm_6b_style"]
TWO_RANK_LAYOUTS = [
    ParallelLayout(),  # DP=2
    ParallelLayout(tensor=2),
    ParallelLayout(tensor=2, sequence_parallel=True),
    ParallelLayout(pipeline=2),
    ParallelLayout(context=2),
]


def _assert_match(report: dict, layouts: list[ParallelLayout]) -> None:
    assert report["reference_grad_scale"] > 1e-2  # gradients large enough to compare
    for layout in layouts:
        result = report[str(layout)]
        assert result["loss"] == pytest.approx(report["reference_loss"], abs=1e-6), layout
        worst = max(result["diffs"], key=result["diffs"].get)
        assert result["grad_diff"] < 1e-6, f"{layout}: {worst} off by {result['grad_diff']}"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_two_rank_layouts_match_one_rank(tmp_path, flavour):
    # PP=2 with an uneven split: stage 0 (which also runs the ViT) gets 1 of the 4 LLM layers.
    report = run_on_ranks(
        internvl_cases.layout_parity,
        2,
        str(tmp_path),
        flavour,
        TWO_RANK_LAYOUTS,
        first_stage_layers=1,
    )[0]
    _assert_match(report, TWO_RANK_LAYOUTS)


def test_micro_batch_of_two_unpacked_rows(tmp_path):
    layouts = [ParallelLayout(tensor=2, sequence_parallel=True), ParallelLayout(context=2)]
    report = run_on_ranks(
        internvl_cases.layout_parity, 2, str(tmp_path), FLAVOURS[1], layouts, packed=False
    )[0]
    _assert_match(report, layouts)


def test_four_rank_mixed_layouts(tmp_path):
    layouts = [
        ParallelLayout(tensor=2, pipeline=2),
        ParallelLayout(tensor=2, context=2, sequence_parallel=True),
    ]
    report = run_on_ranks(
        internvl_cases.layout_parity,
        4,
        str(tmp_path),
        FLAVOURS[1],
        layouts,
        first_stage_layers=1,
    )[0]
    _assert_match(report, layouts)


def test_distributed_optimizer_with_tp2_dp2_matches_plain_optimizer(tmp_path):
    result = run_on_ranks(
        internvl_cases.distributed_optimizer_parity,
        4,
        str(tmp_path),
        FLAVOURS[1],
        ParallelLayout(tensor=2),
    )[0]
    assert result["loss"] == pytest.approx(result["reference_loss"], abs=1e-6)
    assert result["grad_norm"] == pytest.approx(result["reference_grad_norm"], rel=1e-5)
    assert result["reference_grad_norm"] > 0.1  # clipping ran
    assert result["update_size"] > 1e-3
    assert result["param_diff"] < 1e-6


def test_activation_recomputation_gives_the_same_gradients(tmp_path):
    layouts = [ParallelLayout(tensor=2, sequence_parallel=True)]
    report = run_on_ranks(
        internvl_cases.layout_parity,
        2,
        str(tmp_path),
        FLAVOURS[0],
        layouts,
        recompute="full",
    )[0]
    _assert_match(report, layouts)
