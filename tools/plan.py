#!/usr/bin/env python
"""Choose a parallel layout for an InternVL flavour: the best few, with the overrides to run them.

Predicts per-GPU memory and step time of every layout (megatron_internvl/planner/model.py says
how, and which rates are assumed), refuses those that cannot run or fit with the reason, and
prints the shipped recipe's layout alongside. The workload (global batch, sequence length, tile
limit, stage) comes from the flavour's recipe, `recipe=<model>_stage2` unless --recipe says.

    python tools/plan.py --model internvl2_5_78b --gpus 1024 --gpu-memory-gb 80
    python tools/plan.py --model internvl2_5_8b --gpus 512 --seq-length 8192 --future
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", required=True, help="flavour name from the registry")
    add("--gpus", type=int, required=True, help="world size")
    add("--gpu-memory-gb", type=float, default=80.0)
    add("--recipe", help="recipe giving the workload and shipped layout (default <model>_stage2)")
    add("--seq-length", type=int, help="tokens per packed row (default: the recipe's)")
    add("--global-batch", type=int, help="rows per step (default: the recipe's)")
    # Defaults: benchmarks/dp_balance.py's simulated InternVL 2.5 mix packs ~38 tiles and ~8
    # samples of ~1600 tokens into a 16384-token row.
    add("--mean-tiles", type=float, default=36.0, help="tiles of an average row (step time)")
    add("--mean-sample-length", type=int, default=1600, help="tokens of an average sample")
    add("--achievable-tflops", type=float, default=400.0, help="sustained bf16 TFLOP/s per GPU")
    add("--nvlink-gb-s", type=float, default=300.0, help="collective bandwidth in a node")
    add("--network-gb-s", type=float, default=40.0, help="bandwidth per GPU between nodes")
    add("--top", type=int, default=5, help="layouts to print")
    add("--future", action="store_true", help="also rank layouts the code cannot run yet")
    return parser


def _describe(plan, label: str = "") -> str:
    lay, pred = plan.layout, plan.prediction
    first = f" first_stage_layers={lay.first_stage_layers}" if lay.first_stage_layers else ""
    vt = f" vision_tp={lay.vision_tensor}" if lay.vision_tensor != lay.tensor else ""
    mem = ", ".join(f"{k} {v:.1f}" for k, v in pred.memory_parts_gb.items())
    time = ", ".join(f"{k} {v:.2f}" for k, v in pred.parts_s.items())
    lines = [
        f"{label}TP={lay.tensor}{vt} PP={lay.pipeline}{first} CP={lay.context} "
        f"recompute={lay.recompute} micro_batch={lay.micro_batch}: "
        f"step {pred.step_s:.2f} s ({pred.model_tflops_per_gpu:.0f} model TFLOP/s/GPU), "
        f"peak {max(pred.memory_gb):.1f} GB",
        f"    memory GB (largest stage): {mem}",
        f"    step s: {time}",
    ]
    if plan.future:
        lines.append("    FUTURE, not runnable today: needs " + "; ".join(plan.future))
    lines.append("    overrides: " + " ".join(plan.overrides()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore")  # Megatron's "TE/apex not installed" notes at import

    from megatron_internvl.config.schema import load_run_config
    from megatron_internvl.models.registry import get_spec
    from megatron_internvl.parallel import runtime
    from megatron_internvl.planner.model import Hardware, Layout, Workload, predict
    from megatron_internvl.planner.params import param_table
    from megatron_internvl.planner.search import Plan, search
    from megatron_internvl.train import compose

    try:
        spec = get_spec(args.model)
        cfg = load_run_config(compose([f"recipe={args.recipe or args.model + '_stage2'}"]))
    except Exception as error:  # unknown flavour or recipe
        print(f"plan: {error}", file=sys.stderr)
        return 2
    work = Workload(
        gpus=args.gpus,
        global_batch=args.global_batch or cfg.train.global_batch,
        seq_length=args.seq_length or cfg.data.seq_length,
        max_tiles_per_row=cfg.data.max_tiles_per_row,
        mean_tiles_per_row=args.mean_tiles,
        mean_sample_length=args.mean_sample_length,
        training_stage=cfg.train.stage,
    )
    hw = Hardware(
        gpu_memory_gb=args.gpu_memory_gb,
        achievable_tflops=args.achievable_tflops,
        nvlink_gb_s=args.nvlink_gb_s,
        network_gb_s=args.network_gb_s,
    )
    with runtime.single_process():
        plans, refused = search(spec, work, hw, future=args.future)
        p = cfg.parallel
        shipped_layout = Layout(
            p.tensor,
            p.vision_tensor or p.tensor,
            p.pipeline,
            p.first_stage_layers,
            p.context,
            cfg.model.recompute or "none",
            cfg.train.micro_batch,
        )
        shipped = Plan(
            shipped_layout,
            predict(
                spec,
                param_table(spec, shipped_layout.vision_tensor),
                shipped_layout,
                work,
                hw,
            ),
        )
    print(
        f"{spec.name} on {work.gpus} GPUs x {hw.gpu_memory_gb:g} GB, stage {work.training_stage}: "
        f"{work.global_batch} rows x {work.seq_length} tokens, <= {work.max_tiles_per_row} tiles "
        f"per row (memory), {work.mean_tiles_per_row:g} on average (time); assumed "
        f"{hw.achievable_tflops:g} TFLOP/s, NVLink {hw.nvlink_gb_s:g} GB/s, "
        f"network {hw.network_gb_s:g} GB/s per GPU"
    )
    today = [plan for plan in plans if not plan.future]
    print(f"\nBest {min(args.top, len(today))} of {len(today)} layouts runnable today:")
    for rank, plan in enumerate(today[: args.top], 1):
        print(_describe(plan, f"{rank}. "))
    if args.future:
        later = [plan for plan in plans if plan.future][: args.top]
        print(f"\nBest {len(later)} layouts needing future work:")
        for rank, plan in enumerate(later, 1):
            print(_describe(plan, f"F{rank}. "))
    print(f"\nShipped recipe {cfg.name}:")
    print(_describe(shipped, "   "))
    fits = max(shipped.prediction.memory_gb) <= hw.gpu_memory_gb
    print(f"    {'fits' if fits else 'DOES NOT FIT'} in {hw.gpu_memory_gb:g} GB by this model")
    print(_first_stage_note(plans, shipped))
    print(f"\nrefused {sum(refused.values())} layouts:")
    for reason, count in refused.most_common():
        print(f"  {count:>6}  {reason}")
    return 0


def _first_stage_note(plans: list, shipped: Any) -> str:
    """The planner's stage-0 layer count for the shipped TP/PP/CP/recompute/micro-batch (the
    recipes take theirs from here)."""
    lay = shipped.layout
    if lay.pipeline == 1:
        return "    first_stage_layers: none needed (PP=1)"
    key = lay.without_first_stage()
    same = [plan for plan in plans if plan.layout.without_first_stage() == key]
    if not same:
        return "    first_stage_layers: no fitting choice for this layout"
    best = same[0].layout.first_stage_layers  # plans arrive fastest first
    verdict = "the shipped value" if best == lay.first_stage_layers else "the shipped value differs"
    return f"    planner's first_stage_layers for this layout: {best} ({verdict})"


if __name__ == "__main__":
    sys.exit(main())
