"""Loss curves of the same training run in several precisions, through the real training loop.

Each variant is one `megatron_internvl.train` run (one rank, synthetic packed rows with images,
same seed, so the same data and initial weights; the rows' text follows a fixed permutation of
`--text-vocab` ids, so the loss falls from ln(vocab) within a few hundred steps); losses are
read back from its TensorBoard events with TensorBoard's own reader and compared with the first
variant after smoothing.

  # GPU: FP8 (delayed and current scaling) against bf16, 300 steps of a 1B-width InternVL
  python benchmarks/fp8_convergence.py --variants bf16,fp8-delayed,fp8-tensorwise --backend te \\
      --flavour internvl2_5_1b --llm-layers 4 --vit-layers 4 --seq-length 2048 --steps 300 \\
      --parallel
  # CPU (what CI runs): bf16 against fp32 on the tiny flavour
  python benchmarks/fp8_convergence.py --variants fp32,bf16 --backend local --steps 8

Pass criterion (`--tolerance`, default 2%): after the first 10% of steps, every point of a
variant's smoothed curve (moving average over `--smooth` steps) is within that relative distance
of the reference's smoothed curve. The exit code is 1 when a variant fails, 2 when a run fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# name -> (model.dtype, model.fp8_recipe)
VARIANTS = {
    "fp32": ("float32", "null"),
    "bf16": ("bfloat16", "null"),
    "fp8-delayed": ("bfloat16", "delayed"),
    "fp8-tensorwise": ("bfloat16", "tensorwise"),
}


def train_command(args: argparse.Namespace, variant: str, out: Path) -> list[str]:
    dtype, recipe = VARIANTS[variant]
    torchrun = [sys.executable, "-m", "megatron_internvl.launch.local"]  # torchrun on loopback only
    command = [*torchrun, "--standalone", "--nproc-per-node", "1"]
    command += ["-m", "megatron_internvl.train", "recipe=demo_cpu", f"name={variant}"]
    command += [
        f"output_dir={out}",
        f"model.flavour={args.flavour}",
        f"model.backend={args.backend}",
    ]
    command += [f"model.dtype={dtype}", f"model.fp8_recipe={recipe}"]
    if args.llm_layers:
        command.append(f"model.num_layers={args.llm_layers}")
    if args.vit_layers:
        command.append(f"model.vit_layers={args.vit_layers}")
    command += ["parallel.tensor=1", "parallel.sequence_parallel=false", "parallel.gpus=1"]
    command += ["data.source=synthetic", f"data.seq_length={args.seq_length}"]
    command += [f"data.synthetic_text_vocab={args.text_vocab}"]
    command += [f"train.steps={args.steps}", f"train.global_batch={args.global_batch}"]
    command += [f"train.lr={args.lr}", f"train.min_lr={args.lr / 10}"]
    command += [f"train.warmup_steps={max(args.steps // 20, 1)}", "train.seed=1234"]
    command += ["logging.log_every=1", "checkpoint.save_every=0"]
    return command


def read_losses(run_dir: Path) -> np.ndarray:
    """train/loss by step, from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    return np.array([s.value for s in sorted(scalars, key=lambda s: s.step)])


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def compare(curves: dict[str, np.ndarray], window: int, tolerance: float) -> list[dict]:
    """Per variant: final smoothed loss and the largest relative gap to the first variant."""
    names = list(curves)
    reference = smooth(curves[names[0]], window)
    skip = len(reference) // 10
    rows = []
    for name in names:
        curve = smooth(curves[name], window)
        gap = np.abs(curve - reference)[skip:] / np.abs(reference[skip:])
        rows.append(
            {
                "variant": name,
                "first_loss": float(curves[name][0]),
                "final_loss": float(curve[-1]),
                "max_rel_gap": float(gap.max()),
                "mean_rel_gap": float(gap.mean()),
                "passed": bool(gap.max() <= tolerance),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="bf16,fp8-delayed,fp8-tensorwise")
    parser.add_argument("--backend", choices=("te", "local"), default="te")
    parser.add_argument("--flavour", default="tiny_qwen_300m_style")
    parser.add_argument("--llm-layers", type=int)
    parser.add_argument("--vit-layers", type=int)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--text-vocab",
        type=int,
        default=256,
        help="synthetic text ids drawn from the first N: learnable in a few hundred steps",
    )
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="run the variants at the same time (one GPU holds several small runs)",
    )
    parser.add_argument("--smooth", type=int, default=20, help="moving-average window, steps")
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--out", type=Path, default=Path("runs/fp8_convergence"))
    parser.add_argument("--json", type=Path, help="also write the comparison here")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; use {list(VARIANTS)}")

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    for variant in variants:
        shutil.rmtree(args.out / variant, ignore_errors=True)  # else the run would resume
    args.out.mkdir(parents=True, exist_ok=True)
    # Each run's output goes to a file: several runs at once must not block on a full pipe.
    logs = {v: (args.out / f"{v}.log").open("w") for v in variants}
    running = {}
    for variant in variants:
        print(f"== {variant}", flush=True)
        running[variant] = subprocess.Popen(
            train_command(args, variant, args.out),
            cwd=ROOT,
            env=env,
            stdout=logs[variant],
            stderr=subprocess.STDOUT,
        )
        if not args.parallel:
            running[variant].wait()
    curves = {}
    for variant in variants:
        code = running[variant].wait()
        logs[variant].close()
        text = (args.out / f"{variant}.log").read_text()
        if code != 0:
            print(f"{variant} failed (exit {code}):\n{text[-8000:]}")
            raise SystemExit(2)
        print(
            f"{variant}: " + " | ".join(line for line in text.splitlines() if "step" in line)[-300:]
        )
        curves[variant] = read_losses(args.out / variant)

    steps = min(len(c) for c in curves.values())
    curves = {k: v[:steps] for k, v in curves.items()}
    with open(args.out / "curves.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", *curves])
        writer.writerows([i + 1, *(f"{c[i]:.5f}" for c in curves.values())] for i in range(steps))
    rows = compare(curves, args.smooth, args.tolerance)
    print(
        f"\n{steps} steps, {args.flavour} (LLM layers {args.llm_layers or 'all'}, ViT layers "
        f"{args.vit_layers or 'all'}), {args.seq_length}-token rows, backend {args.backend}; "
        f"smoothed over {args.smooth} steps, reference {variants[0]}, tolerance {args.tolerance}"
    )
    print(f"{'variant':<16}{'first':>9}{'final':>9}{'max gap':>10}{'mean gap':>10}  result")
    for r in rows:
        print(
            f"{r['variant']:<16}{r['first_loss']:>9.4f}{r['final_loss']:>9.4f}"
            f"{r['max_rel_gap']:>10.2%}{r['mean_rel_gap']:>10.2%}  "
            f"{'ok' if r['passed'] else 'OUT OF TOLERANCE'}"
        )
    if args.json:
        summary = {"steps": steps, "smooth": args.smooth, "reference": variants[0], "rows": rows}
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    if argv is None and not all(r["passed"] for r in rows):
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
