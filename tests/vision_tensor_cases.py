"""Rank functions for `parallel.vision_tensor`: several comparisons per spawn of ranks."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from megatron_internvl.models.internvl import build_internvl_chunks
from megatron_internvl.models.registry import get_spec
from megatron_internvl.parallel import cpu_platform
from megatron_internvl.parallel.layout import ParallelLayout
from megatron_internvl.training.build_model import recompute_overrides
from megatron_internvl.training.step import wrap_with_ddp
from tests import internvl_cases, parity

FLAVOUR = "tiny_internlm_6b_style"  # 5 ViT heads (padded to 6 at TP=2), full-width QK-norm


def build_recomputed_beyond_one_rank(layout: ParallelLayout) -> list:
    """model.recompute=full+vit (LLM and ViT layers recomputed) except on one rank."""
    recompute = "full+vit" if layout != ParallelLayout() else None
    chunks = build_internvl_chunks(
        get_spec(FLAVOUR),
        layout,
        internvl_cases.SEQ,
        vision_pad_heads_to=2,
        vision_recompute=recompute is not None,
        **recompute_overrides(recompute),
    )
    for chunk in chunks:
        cpu_platform.adapt_model_config(chunk.config)
        assert chunk.vision_model.config.recompute_granularity == (recompute and "full")
    return wrap_with_ddp(chunks, chunks[0].config)


def two_rank_reports(tmp: str) -> dict[str, Any]:
    """On 2 ranks: TP=2 (+SP) with vision TP=1 against one rank; vision TP 1 against vision
    TP 2 at TP=2 (weights saved at one reload at the other, and back); one clipped Adam step at
    TP=2 with vision TP=1 (the grad norm) against one rank; TP=2+SP, vision TP=1 with the LLM's
    and the ViT's layers recomputed against one rank without recomputation."""
    root = Path(tmp)
    batches = internvl_cases.packed_microbatches(FLAVOUR)

    def compare(layouts: list[ParallelLayout], reference: ParallelLayout, where: str, build=None):
        return parity.compare_layouts(
            root / where,
            build or (lambda layout: internvl_cases.build(FLAVOUR, layout)),
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
        "recomputed": compare(
            vision_tp1[1:], ParallelLayout(), "recomputed", build_recomputed_beyond_one_rank
        ),
    }


def build_with_four_kv_groups(layout: ParallelLayout) -> list:
    """The 6B-style flavour with 4 KV groups, so that its LLM splits over TP=4."""
    spec = get_spec(FLAVOUR)
    spec = dataclasses.replace(
        spec, language=dataclasses.replace(spec.language, num_query_groups=4)
    )
    chunks = build_internvl_chunks(spec, layout, internvl_cases.SEQ, vision_pad_heads_to=2)
    for chunk in chunks:
        cpu_platform.adapt_model_config(chunk.config)
    return wrap_with_ddp(chunks, chunks[0].config)


def four_rank_reports(tmp: str) -> dict[str, Any]:
    """On 4 ranks: PP=2 x TP=2 and CP=2 x TP=2 + SP with vision TP=1 against one rank; one
    clipped Adam step with the distributed optimizer at DP=2 x TP=2, vision TP=1; TP=4 + SP with
    vision TP=2 (two replicas, each sequence-parallel) against one rank."""
    layouts = [
        ParallelLayout(tensor=2, pipeline=2, vision_tensor=1),
        ParallelLayout(tensor=2, context=2, sequence_parallel=True, vision_tensor=1),
    ]
    root = Path(tmp)
    batches = internvl_cases.packed_microbatches(FLAVOUR)
    return {
        "one_rank": internvl_cases.layout_parity(
            str(root / "one_rank"), FLAVOUR, layouts, first_stage_layers=1
        ),
        "optimizer": internvl_cases.distributed_optimizer_parity(
            str(root / "optimizer"), FLAVOUR, ParallelLayout(tensor=2, vision_tensor=1)
        ),
        "vision_sp": parity.compare_layouts(
            root / "vision_sp",
            build_with_four_kv_groups,
            lambda chunks, layout: internvl_cases.step(chunks, layout, batches),
            [ParallelLayout(tensor=4, sequence_parallel=True, vision_tensor=2)],
        ),
    }
