"""Rank functions for `parallel.vision_tensor`: several comparisons per spawn of ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_internvl.parallel.layout import ParallelLayout
from tests import internvl_cases, parity

FLAVOUR = "tiny_internlm_6b_style"  # 5 ViT heads (padded to 6 at TP=2), full-width QK-norm


def two_rank_reports(tmp: str) -> dict[str, Any]:
    """On 2 ranks: TP=2 (+SP) with vision TP=1 against one rank; vision TP 1 against vision
    TP 2 at TP=2 (weights saved at one reload at the other, and back); one clipped Adam step at
    TP=2 with vision TP=1 (the grad norm) against one rank."""
    root = Path(tmp)
    batches = internvl_cases.packed_microbatches(FLAVOUR)

    def compare(layouts: list[ParallelLayout], reference: ParallelLayout, where: str):
        return parity.compare_layouts(
            root / where,
            lambda layout: internvl_cases.build(FLAVOUR, layout),
            lambda chunks, layout: internvl_cases.step(chunks, layout, batches),
            layouts,
            reference,
        )

    vision_tp1 = [
        ParallelLayout(tensor=2, vision_tensor=1),
        ParallelLayout(tensor=2, sequence_parallel=True, vision_tensor=1),
    ]
    return {
        "one_rank": compare(vision_tp1, ParallelLayout(), "one_rank"),
        "resharded": compare(vision_tp1[:1], ParallelLayout(tensor=2), "resharded"),
        "optimizer": internvl_cases.distributed_optimizer_parity(
            str(root / "optimizer"), FLAVOUR, ParallelLayout(tensor=2, vision_tensor=1)
        ),
    }


def four_rank_reports(tmp: str) -> dict[str, Any]:
    """On 4 ranks: PP=2 x TP=2 and CP=2 x TP=2 + SP with vision TP=1 against one rank; one
    clipped Adam step with the distributed optimizer at DP=2 x TP=2, vision TP=1."""
    layouts = [
        ParallelLayout(tensor=2, pipeline=2, vision_tensor=1),
        ParallelLayout(tensor=2, context=2, sequence_parallel=True, vision_tensor=1),
    ]
    root = Path(tmp)
    return {
        "one_rank": internvl_cases.layout_parity(
            str(root / "one_rank"), FLAVOUR, layouts, first_stage_layers=1
        ),
        "optimizer": internvl_cases.distributed_optimizer_parity(
            str(root / "optimizer"), FLAVOUR, ParallelLayout(tensor=2, vision_tensor=1)
        ),
    }
