"""The GPU results file and the README table made from it.

`scripts/gpu_checks.sh` leaves one JSON per benchmark in its output folder (`train_step.py --json`,
`fp8_convergence.py --json`) and the versions in `versions.json`; this tool gathers them into one
record, the file committed as `benchmarks/results/gpu-<date>.json`:

  python benchmarks/gpu_report.py collect gpu_results benchmarks/results/gpu-2026-11-29.json
  python benchmarks/gpu_report.py readme benchmarks/results/gpu-2026-11-29.json README.md

The record: `gpu`, `torch`, `te`, `date`, `dry_run`; `workloads[name][precision]` with `step_s`,
`tokens_per_s`, `tflops_per_gpu`, `mfu`, `peak_mem_gb` (ours) and `baseline` (transformers, same
fields); `fp8_curve_max_gap` (the largest smoothed relative gap of any FP8 curve to bf16).
`readme` rewrites the table between the `<!-- gpu-results -->` markers from such a file, so the
README never holds a figure the file does not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

WORKLOADS = ("bench_llm", "bench_internvl")  # the train_step.py runs gpu_checks.sh makes
BEGIN, END = "<!-- gpu-results -->", "<!-- /gpu-results -->"
FIELDS = {  # record field -> train_step.py result key
    "step_s": "step_s",
    "tokens_per_s": "tokens_s",
    "tflops_per_gpu": "tflops",
    "mfu": "mfu",
    "peak_mem_gb": "memory_gib",
}


def _figures(result: dict[str, Any]) -> dict[str, Any]:
    return {field: result.get(key) for field, key in FIELDS.items()}


def workload_record(bench: dict[str, Any]) -> dict[str, Any]:
    """One train_step.py run: ours per precision, with transformers' row of the same dtype."""
    theirs = {r["precision"]: r for r in bench["results"] if not r["model"].startswith("ours")}
    record: dict[str, Any] = {
        "flavour": bench["flavour"],
        "part": bench["part"],
        "llm_layers": bench["llm_layers"],
        "vit_layers": bench["vit_layers"],
        "tokens_per_step": bench["tokens_per_step"],
        "tflop_per_step": bench["tflop_per_step"],
        "precisions": {},
    }
    for result in bench["results"]:
        if not result["model"].startswith("ours"):
            continue
        figures = _figures(result)
        kind = "fp32" if result["precision"] == "fp32" else "bf16"
        if kind in theirs:
            figures["baseline"] = _figures(theirs[kind])
        record["precisions"][result["precision"]] = figures
    return record


def collect(run_dir: Path) -> dict[str, Any]:
    """Gather one gpu_checks.sh output folder into the results record."""
    versions = json.loads((run_dir / "versions.json").read_text())
    record: dict[str, Any] = {**versions, "workloads": {}, "fp8_curve_max_gap": None}
    for name in WORKLOADS:
        path = run_dir / f"{name}.json"
        if path.exists():
            record["workloads"][name] = workload_record(json.loads(path.read_text()))
    curves = run_dir / "fp8_convergence.json"
    if curves.exists():
        rows = json.loads(curves.read_text())["rows"][1:]  # the first is the reference
        gaps = [r["max_rel_gap"] for r in rows if r["variant"].startswith("fp8")]
        record["fp8_curve_max_gap"] = max(gaps) if gaps else None
        record["curve_gaps"] = {r["variant"]: r["max_rel_gap"] for r in rows}
    return record


def _cell(figures: dict[str, Any]) -> str:
    mfu = "-" if figures.get("mfu") is None else f"{100 * figures['mfu']:.1f}%"
    mem = figures.get("peak_mem_gb")
    mem_text = "-" if mem is None else f"{mem:.1f} GiB"
    tokens = figures.get("tokens_per_s")
    tokens_text = "-" if tokens is None else f"{tokens:,.0f} tok/s"
    return f"{figures['step_s']:.4f} s, {tokens_text}, {mfu} MFU, {mem_text}"


def table(record: dict[str, Any]) -> str:
    """The README table: one row per workload and precision, ours beside transformers."""
    lines = [
        f"{record['gpu']} (torch {record['torch']}, TE {record['te']}, {record['date']}"
        f"{'; DRY RUN on CPU, tiny flavours' if record.get('dry_run') else ''}):",
        *([f"({record['note']})"] if record.get("note") else []),
        "",
        "| workload | precision | ours | transformers | ours / transformers | vs ours bf16 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, work in record["workloads"].items():
        shape = (
            f"{work['flavour']} {work['part']}: {work['llm_layers']} LLM layers"
            + (f", {work['vit_layers']} ViT layers" if work["part"] == "internvl" else "")
            + f", {work['tokens_per_step']} tokens, {work['tflop_per_step']:.2f} TFLOP/step"
        )
        bf16 = work["precisions"].get("bf16")
        for precision, figures in work["precisions"].items():
            base = figures.get("baseline")
            theirs = _cell(base) if base else "-"
            ratio = f"{base['step_s'] / figures['step_s']:.2f}x" if base else "-"
            speedup = f"{bf16['step_s'] / figures['step_s']:.2f}x" if bf16 else "-"
            lines.append(
                f"| {shape} ({name}) | {precision} | {_cell(figures)} | {theirs} | {ratio} "
                f"| {speedup} |"
            )
    gap = record.get("fp8_curve_max_gap")
    gap_text = "not measured" if gap is None else f"{100 * gap:.2f}%"
    lines += ["", f"FP8-vs-bf16 loss curves, largest smoothed relative gap: {gap_text}."]
    return "\n".join(lines)


def rewrite_readme(record: dict[str, Any], readme: Path) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} markers to write the table between")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table(record)}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gather = sub.add_parser("collect", help="a gpu_checks.sh output folder -> one results file")
    gather.add_argument("run_dir", type=Path)
    gather.add_argument("out", type=Path)
    render = sub.add_parser("readme", help="rewrite the README's GPU table from a results file")
    render.add_argument("results", type=Path)
    render.add_argument("readme", type=Path)
    args = parser.parse_args(argv)
    if args.command == "collect":
        record = collect(args.run_dir)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(table(record))
    else:
        rewrite_readme(json.loads(args.results.read_text()), args.readme)


if __name__ == "__main__":
    main()
