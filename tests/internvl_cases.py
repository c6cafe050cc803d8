"""Rank functions for the tiny InternVL flavours: layout parity of the whole model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_internvl.models.internvl import build_internvl_chunks
from megatron_internvl.models.registry import get_spec
from megatron_internvl.parallel import cpu_platform
from megatron_internvl.parallel.layout import ParallelLayout
from megatron_internvl.training.step import forward_backward, internvl_forward_step, wrap_with_ddp
from tests import parity

SEQ = 32


def packed_microbatches(spec_name: str, seed: int = 0) -> list[dict[str, Any]]:
    """Packed rows (b=1) of three sub-samples, one with images; plus a text-only row.

    Sub-sample lengths are multiples of 4 so CP=2 can split each one.
    """
    spec = get_spec(spec_name)
    tpt = spec.tokens_per_tile
    size = spec.vision.image_size
    gen = torch.Generator().manual_seed(seed)
    vocab = spec.language.vocab_size
    rows = []
    for tiles in ((2, 1), (1, 0), (0, 0)):
        lengths = [8, 16, 8]
        tokens = torch.randint(0, spec.image_token_id, (1, SEQ), generator=gen)
        # Sample 1 carries tiles[0] tiles, sample 2 carries tiles[1]: IMG_CONTEXT runs.
        tokens[0, 9 : 9 + tpt * tiles[0]] = spec.image_token_id
        tokens[0, 25 : 25 + tpt * tiles[1]] = spec.image_token_id
        labels = torch.randint(0, vocab, (1, SEQ), generator=gen)
        loss_mask = (tokens != spec.image_token_id).float()
        loss_mask[0, :3] = 0
        bounds = torch.tensor([0, 8, 24, 32])
        positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        n_tiles = sum(tiles)
        rows.append(
            {
                "tokens": tokens,
                "labels": labels,
                "loss_mask": loss_mask,
                "position_ids": positions,
                "cu_seqlens": bounds,
                "images": torch.randn(n_tiles, 3, size, size, generator=gen) if n_tiles else None,
            }
        )
    rows.append(dict(rows[0]))  # 4 microbatches: divisible by DP=2 and PP=2
    return rows


def unpacked_microbatches(spec_name: str, seed: int = 0) -> list[dict[str, Any]]:
    """Micro-batches of two plain rows each (b=2, no packing), images in both rows."""
    spec = get_spec(spec_name)
    tpt, size = spec.tokens_per_tile, spec.vision.image_size
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(4):
        tokens = torch.randint(0, spec.image_token_id, (2, SEQ), generator=gen)
        tokens[0, 2 : 2 + 2 * tpt] = spec.image_token_id  # row 0: 2 tiles
        tokens[1, 5 : 5 + tpt] = spec.image_token_id  # row 1: 1 tile
        batches.append(
            {
                "tokens": tokens,
                "labels": torch.randint(0, spec.language.vocab_size, (2, SEQ), generator=gen),
                "loss_mask": (tokens != spec.image_token_id).float(),
                "position_ids": torch.arange(SEQ).expand(2, SEQ),
                "images": torch.randn(3, 3, size, size, generator=gen),
            }
        )
    return batches


def build(
    spec_name: str,
    layout: ParallelLayout,
    first_stage_layers: int | None = None,
    use_distributed_optimizer: bool = False,
    recompute: str | None = None,
):
    spec = get_spec(spec_name)
    # Pad ViT heads for TP=2 in every layout (the reference too), so checkpoints share shapes;
    # tests/test_vision.py proves padded heads change nothing.
    extra = (
        {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
        if recompute == "full"
        else {}
    )
    chunks = build_internvl_chunks(
        spec, layout, SEQ, first_stage_layers=first_stage_layers, vision_pad_heads_to=2, **extra
    )
    for chunk in chunks:
        cpu_platform.adapt_model_config(chunk.config)
    return wrap_with_ddp(chunks, chunks[0].config, use_distributed_optimizer)


def step(chunks, layout: ParallelLayout, batches) -> float:
    microbatches = parity.layout_batches(batches, layout)
    micro_batch_size = microbatches[0]["tokens"].size(0)
    return forward_backward(
        internvl_forward_step,
        parity.data_iterators(microbatches, len(chunks)),
        chunks,
        num_microbatches=len(microbatches),
        seq_length=SEQ,
        micro_batch_size=micro_batch_size,
    )


def layout_parity(
    tmp: str,
    spec_name: str,
    layouts: list[ParallelLayout],
    first_stage_layers: int | None = None,
    packed: bool = True,
    recompute: str | None = None,
) -> dict[str, Any]:
    """Loss and gradient differences of the whole InternVL model against one rank."""
    batches = packed_microbatches(spec_name) if packed else unpacked_microbatches(spec_name)
    return parity.compare_layouts(
        Path(tmp),
        lambda layout: build(spec_name, layout, first_stage_layers, recompute=recompute),
        lambda chunks, layout: step(chunks, layout, batches),
        layouts,
    )


def frozen_stage_step(tmp: str, spec_name: str, stage: str, layout: ParallelLayout) -> dict:
    """One Adam step at `stage`: which parameters moved, and how many hold optimizer state."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_internvl.training.freezing import freeze_for_stage

    parity.use_layout(layout)
    spec = get_spec(spec_name)
    chunks = build_internvl_chunks(spec, layout, SEQ, vision_pad_heads_to=2)
    for chunk in chunks:
        cpu_platform.adapt_model_config(chunk.config)
    counts = freeze_for_stage(chunks, stage)
    before = {n: p.detach().clone() for c in chunks for n, p in c.named_parameters()}
    model = wrap_with_ddp(chunks, chunks[0].config)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2), model)
    optimizer.zero_grad()
    loss = step(model, layout, packed_microbatches(spec_name))
    optimizer.step()
    moved = sorted(
        {
            n.split(".", 1)[0]
            for c in chunks
            for n, p in c.named_parameters()
            if not torch.equal(p, before[n])
        }
    )
    state_numel = sum(
        state["exp_avg"].numel()
        for inner in getattr(optimizer, "chained_optimizers", [optimizer])
        for state in inner.optimizer.state.values()
    )
    return {"loss": loss, "moved": moved, "counts": counts, "optimizer_state_numel": state_numel}


def distributed_optimizer_parity(tmp: str, spec_name: str, layout: ParallelLayout) -> dict:
    """One clipped Adam step of the whole model: distributed optimizer at `layout` vs plain."""
    from megatron.core.optimizer import OptimizerConfig

    batches = packed_microbatches(spec_name)
    return parity.compare_optimizer_step(
        Path(tmp),
        lambda at, distributed: build(spec_name, at, use_distributed_optimizer=distributed),
        lambda chunks, at: step(chunks, at, batches),
        layout,
        # adam_eps 1e-4: see tests/gpt_cases.py
        OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.1, weight_decay=0.05, adam_eps=1e-4),
    )
