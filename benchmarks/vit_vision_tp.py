#!/usr/bin/env python
"""The ViT's per-GPU work under two layouts of one LLM tensor-parallel group, on one device.

At TP = t with the ViT at the LLM's TP (the default, `parallel.vision_tensor` = t), every GPU of
the group runs all of the micro-batch's tiles through a 1/t slice of the ViT: heads padded to a
multiple of t (6B: 25 -> 32 at t = 8, 28% dummy attention work), 1/t of the MLP, plus per-layer
all-reduces. With `parallel.vision_tensor=1` every GPU runs the whole ViT (25 heads, no
padding) on 1/t of the tiles, and the image embeddings are all-gathered once. This times one
training step (forward + backward) of each on one device, so it measures the per-GPU compute of
each layout; the padded layout's per-layer all-reduces are not included (they only add to it),
and its norms run here on the whole sequence rather than on a 1/t SP shard (a small cost).

    python benchmarks/vit_vision_tp.py --model internvl2_5_78b --tp 8 --tiles 48 --vit-layers 4
    python benchmarks/vit_vision_tp.py --dry-run   # a tiny flavour on the CPU: proves the script

Prints one line per layout and their ratio; --json writes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from megatron_internvl.config.precision import PrecisionConfig
from megatron_internvl.models.registry import VisionConfig, get_spec
from megatron_internvl.models.vision import (
    InternViT,
    padded_heads,
    vision_transformer_config,
)


def layouts(vision: VisionConfig, tp: int, tiles: int) -> list[dict[str, Any]]:
    """Per GPU: heads, MLP width and tiles of each layout of a TP group of `tp` GPUs."""
    padded = padded_heads(vision.num_attention_heads, tp)
    return [
        {
            "layout": f"vision_tensor=1 (whole ViT, {math.ceil(tiles / tp)} of {tiles} tiles)",
            "heads": vision.num_attention_heads,
            "ffn": vision.ffn_hidden_size,
            "tiles": math.ceil(tiles / tp),
        },
        {
            "layout": f"vision_tensor={tp} (1/{tp} of the ViT, {padded} padded heads, "
            f"all {tiles} tiles)",
            "heads": padded // tp,
            "ffn": vision.ffn_hidden_size // tp,
            "tiles": tiles,
        },
    ]


def time_step(vision: VisionConfig, case: dict, numerics: dict, backend: str, args) -> dict:
    """Median seconds of forward + backward of the ViT for one layout's per-GPU share."""
    from megatron_internvl.models.specs import get_backend
    from megatron_internvl.parallel.layout import ParallelLayout

    config = vision_transformer_config(
        vision,
        ParallelLayout(),
        num_attention_heads=case["heads"],
        num_query_groups=case["heads"],
        ffn_hidden_size=case["ffn"],
        **numerics,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vit = InternViT(config, vision, get_backend(backend)).to(device)
    size = vision.image_size
    dtype = config.params_dtype
    pixels = torch.randn(case["tiles"], 3, size, size, dtype=dtype, device=device)
    times = []
    for i in range(args.warmup + args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        vit(pixels).float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - began)
        vit.zero_grad(set_to_none=True)
    return {**case, "step_s": statistics.median(times), "steps": len(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="internvl2_5_78b", help="its ViT (78B: InternViT-6B)")
    parser.add_argument("--tp", type=int, default=8, help="the LLM's tensor-parallel size")
    parser.add_argument("--tiles", type=int, default=48, help="tiles in the micro-batch")
    parser.add_argument("--vit-layers", type=int, default=4, help="of the ViT's (same per layer)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny_internlm_6b_style (5 heads) at TP 2, 4 tiles, fp32 local layers on the CPU",
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # Megatron's config deprecation notes
    if args.dry_run:
        args.model, args.tp, args.tiles, args.warmup, args.repeats = (
            "tiny_internlm_6b_style", 2, 4, 1, 2
        )  # fmt: skip
    elif not torch.cuda.is_available():
        print("vit_vision_tp: needs a CUDA GPU (or --dry-run on the CPU)", file=sys.stderr)
        return 2
    from megatron_internvl.parallel import runtime

    spec = get_spec(args.model)
    vision = dataclasses.replace(
        spec.vision, num_layers=min(args.vit_layers, spec.vision.num_layers)
    )
    precision = PrecisionConfig("float32" if args.dry_run else "bfloat16")
    backend = "local" if args.dry_run else "te"
    with runtime.single_process():
        results = [
            time_step(vision, case, precision.transformer_overrides(), backend, args)
            for case in layouts(vision, args.tp, args.tiles)
        ]
    device = "CPU" if args.dry_run else torch.cuda.get_device_name()
    print(f"{spec.name} ViT, {vision.num_layers} layers, TP group of {args.tp}, {args.tiles} "
          f"tiles per micro-batch, one step (forward + backward) on {device}:")  # fmt: skip
    for r in results:
        print(f"  {r['layout']}: {r['step_s'] * 1000:.1f} ms (median of {r['steps']})")
    ratio = results[1]["step_s"] / results[0]["step_s"]
    print(f"  per-GPU ViT time, padded TP over vision TP 1: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "results": results, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
