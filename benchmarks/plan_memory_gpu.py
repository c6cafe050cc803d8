#!/usr/bin/env python
"""The planner's activation estimate against measured peak memory, on one GPU (needs CUDA + TE).

Builds a flavour at its real widths but reduced depth (so it fits one GPU at TP=1), runs one
training step (one packed row: --seq-length tokens of --sample-length samples, --tiles tiles) in
bf16 with Transformer Engine, and compares
  measured = peak allocated during forward+backward - allocated before it (weights, grads, Adam)
  planned  = planner.model.activation_bytes for the same shape and layout,
with and without recomputation. Target: within 10%. Prints one JSON line per case.

    python benchmarks/plan_memory_gpu.py --model internvl2_5_26b --llm-layers 4 --vit-layers 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch


def _row(spec, seq: int, sample: int, tiles: int) -> dict:
    """One packed row: the first sample carries all tiles' <IMG_CONTEXT> tokens."""
    image_tokens = tiles * spec.tokens_per_tile
    lengths = [max(sample, image_tokens + 8)]
    while sum(lengths) + sample <= seq:
        lengths.append(sample)
    lengths[-1] += seq - sum(lengths)
    tokens = torch.randint(0, spec.image_token_id, (1, seq))
    tokens[0, 4 : 4 + image_tokens] = spec.image_token_id
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    size = spec.vision.image_size
    return {
        "tokens": tokens,
        "labels": torch.randint(0, spec.language.vocab_size, (1, seq)),
        "loss_mask": (tokens != spec.image_token_id).float(),
        "position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
        "cu_seqlens": bounds,
        "images": torch.randn(tiles, 3, size, size, dtype=torch.bfloat16),
    }


def measure(spec, recompute: str, args) -> dict:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_internvl.config.precision import PrecisionConfig
    from megatron_internvl.models.internvl import build_internvl_chunks
    from megatron_internvl.parallel.layout import ParallelLayout
    from megatron_internvl.planner.model import Layout, Workload, activation_bytes
    from megatron_internvl.training.loop import recompute_overrides
    from megatron_internvl.training.step import (
        forward_backward,
        internvl_forward_step,
        wrap_with_ddp,
    )

    chunks = build_internvl_chunks(
        spec,
        ParallelLayout(),
        args.seq_length,
        backend="te",
        precision=PrecisionConfig("bfloat16"),
        **recompute_overrides(None if recompute == "none" else recompute),
    )
    model = wrap_with_ddp(chunks, chunks[0].config, use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-5,
            bf16=True,
            params_dtype=torch.bfloat16,
            use_distributed_optimizer=True,
        ),
        model,
    )
    row = _row(spec, args.seq_length, args.sample_length, args.tiles)
    for _ in range(2):  # the second step runs with Adam's state allocated
        optimizer.zero_grad()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward(
            internvl_forward_step,
            iter([row]),
            model,
            num_microbatches=1,
            seq_length=args.seq_length,
            micro_batch_size=1,
        )
        peak = torch.cuda.max_memory_allocated() - before
        optimizer.step()
    layout = Layout(1, 1, 1, None, 1, recompute, 1)
    work = Workload(1, 1, args.seq_length, args.tiles, args.tiles, args.sample_length)
    planned = activation_bytes(spec, layout, work, 0, spec.language.num_layers)
    return {
        "model": spec.name,
        "recompute": recompute,
        "tiles": args.tiles,
        "seq_length": args.seq_length,
        "measured_gb": peak / 2**30,
        "planned_gb": planned / 2**30,
        "planned_over_measured": planned / peak,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="internvl2_5_26b")
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--vit-layers", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--sample-length", type=int, default=2048)
    parser.add_argument("--tiles", type=int, default=12)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("plan_memory_gpu: needs a CUDA GPU (and Transformer Engine)", file=sys.stderr)
        return 2
    from megatron_internvl.models.registry import get_spec
    from megatron_internvl.parallel import runtime

    base = get_spec(args.model)
    spec = dataclasses.replace(
        base,
        language=dataclasses.replace(base.language, num_layers=args.llm_layers),
        vision=dataclasses.replace(base.vision, num_layers=args.vit_layers),
    )
    with runtime.single_process():
        for recompute in ("none", "full"):
            print(json.dumps(measure(spec, recompute, args)), flush=True)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
