"""The CPU demo's step time with and without the data prefetch thread, in one run.

Usage: python benchmarks/demo_prefetch.py [--steps 12] [--nproc 2] [--repeats 1] [--out DIR]

Trains the CPU demo recipe (`recipe=demo_cpu_shards`: bundled demo shards, TP=2 + SP on 2 CPU
ranks) through the training entry (`torchrun -m megatron_internvl.train`) with `data.prefetch=0`
(every step reads, tiles, tokenizes and packs its micro-batches first) and `data.prefetch=2`
(a background thread does that during the previous step), rounds interleaved. Prints the mean step
time and the time a step waited for data (the loop's Megatron-Core timers), skipping the first
two steps (start-up); with --repeats, the median and the best of the runs' means.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^step\s+(\d+) \| loss .*?\| ([\d,]+) tok/s", re.MULTILINE)
WAIT_LINE = re.compile(r"^step\s+(\d+) \| ms per step .*?data-wait ([\d.]+)", re.MULTILINE)


def run_demo(
    out: Path, shards: Path, prefetch: int, steps: int, nproc: int, repeat: int
) -> dict[str, float]:
    """Mean seconds per step and data-wait ms per step (steps 3..; a loader fill serves several
    steps, so the mean, not the median, shows its cost), from the console."""
    torchrun = [sys.executable, "-m", "megatron_internvl.launch.local"]  # loopback only
    name = f"prefetch{prefetch}-run{repeat}"  # a fresh run directory: a run saves at its end
    result = subprocess.run(
        [*torchrun, "--standalone", "--nproc-per-node", str(nproc), "-m", "megatron_internvl.train"]
        + ["recipe=demo_cpu_shards", f"name={name}", f"output_dir={out}", f"data.shards=[{shards}]"]
        + [f"train.steps={steps}", "logging.log_every=1", "checkpoint.save_every=0"]
        + [f"data.prefetch={prefetch}", "logging.tensorboard=false", "checkpoint.resume=false"]
        + ([] if nproc == 2 else [f"parallel.gpus={nproc}"]),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise SystemExit(f"demo run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    tokens = 512 * 2  # recipe: seq_length 512, global_batch 2
    seconds = [tokens / float(t.replace(",", "")) for s, t in STEP_LINE.findall(result.stdout)]
    waits = [float(w) for s, w in WAIT_LINE.findall(result.stdout) if int(s) > 2]
    return {"step_s": statistics.mean(seconds[2:]), "wait_ms": statistics.mean(waits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="where runs go (default: temp)")
    args = parser.parse_args()
    if args.steps < 6:
        parser.error("--steps must be >= 6 (two start-up steps are skipped)")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        shards = out / "demo_shards"
        build = [sys.executable, "tools/build_shards.py", "--demo", "--no-progress"]
        subprocess.run(
            [*build, "--out", str(shards)],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        results: dict[int, list[dict[str, float]]] = {0: [], 2: []}
        for repeat in range(args.repeats):
            for prefetch, runs in results.items():
                runs.append(run_demo(out, shards, prefetch, args.steps, args.nproc, repeat))
    print_results(results, args)


def print_results(results: dict[int, list[dict[str, float]]], args: argparse.Namespace) -> None:
    """Per prefetch setting: step time and data wait, median and best (min) over the runs."""
    print(
        f"CPU demo (demo_cpu_shards, {args.nproc} ranks), mean over steps 3..{args.steps}; "
        f"median and best of {args.repeats} run(s) each, interleaved"
    )
    header = ("s/step median", "s/step best", "wait ms median", "wait ms best")
    print(f"{'data.prefetch':>14}" + "".join(f"{h:>16}" for h in header))
    summary = {}
    for prefetch, runs in results.items():
        steps, waits = [r["step_s"] for r in runs], [r["wait_ms"] for r in runs]
        summary[prefetch] = (statistics.median(steps), min(steps))
        figures = (*summary[prefetch], statistics.median(waits), min(waits))
        print(f"{prefetch:>14}" + "".join(f"{f:>16.3f}" for f in figures[:2]) +
              "".join(f"{f:>16.1f}" for f in figures[2:]))  # fmt: skip
    (base_median, base_best), (median, best) = summary[0], summary[2]
    print(
        f"prefetch speed-up: {base_median / median:.2f}x (medians), {base_best / best:.2f}x (best)"
    )


if __name__ == "__main__":
    main()
