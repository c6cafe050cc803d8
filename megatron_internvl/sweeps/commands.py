"""The sweep workflow as functions (tools/sweep.py is their command line):
plan -> launch -> collect -> fit -> report (figures + markdown)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_internvl.sweeps import collect as collect_mod
from megatron_internvl.sweeps.config import SweepConfig
from megatron_internvl.sweeps.plan import Plan, build_plan, sweep_dir, write_plan

FIT_FILE = "fit.json"
REPORT_FILE = "report.md"


def plan(cfg: SweepConfig, write: bool = True) -> Plan:
    """Expand and validate the plan; `write`: also write it (plan.json, points/<id>/point.json)."""
    result = build_plan(cfg)
    if write:
        write_plan(cfg, result)
    return result


def describe(result: Plan) -> str:
    lines = [
        f"{len(result.points)} points in {result.sweep_dir} (rows drawn from the data: "
        f"{result.data['mean_tiles_per_row']:.2f} tiles and "
        f"{result.data['mean_samples_per_row']:.2f} samples per {result.data['seq_length']}-token "
        "row)",
        f"{'point':42s} {'steps':>6s} {'tokens':>10s} {'FLOPs':>10s} {'N':>10s}",
    ]
    for p in result.points:
        lines.append(
            f"{p.id:42s} {p.steps:6d} {p.tokens:10,d} {p.flops:10.3g} "
            f"{p.params['non_embedding']:10,d}"
        )
    lines += [f"dropped: {reason}" for reason in result.dropped]
    return "\n".join(lines)


def launch(
    name: str,
    overrides: list[str],
    only: list[str] | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> int:
    """Run the sweep recipe `name` as a Hydra multirun (megatron_internvl.sweeps.app) in a
    child process: every point not yet done, or `only` these; 0 if all that ran succeeded."""
    import subprocess
    import sys

    extra = [f"launch.only=[{','.join(repr(i) for i in only)}]"] if only else []
    extra += ["launch.force=true"] * force + ["launch.dry_run=true"] * dry_run
    command = [sys.executable, "-m", "megatron_internvl.sweeps.app", "--multirun"]
    return subprocess.run([*command, "--config-name", name, *overrides, *extra]).returncode


def collect(cfg: SweepConfig) -> list[dict[str, Any]]:
    return collect_mod.collect(sweep_dir(cfg), cfg.fit.smoothing)


def fit(cfg: SweepConfig, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    from megatron_internvl.sweeps.fit import fit_sweep

    rows = collect(cfg) if rows is None else rows
    result = fit_sweep(
        rows,
        cfg.fit.loss,
        cfg.fit.bootstrap,
        cfg.fit.holdout_fraction,
        cfg.fit.seed,
        cfg.fit.max_heldout_error,
        cfg.fit.params,
    )
    (sweep_dir(cfg) / FIT_FILE).write_text(json.dumps(result, indent=1))
    return result


def report(cfg: SweepConfig) -> Path:
    """Collect, fit, draw and write report.md; returns its path."""
    from megatron_internvl.sweeps.plots import draw_all
    from megatron_internvl.sweeps.report import write_report

    rows = collect(cfg)
    result = fit(cfg, rows)
    out = sweep_dir(cfg)
    figures = draw_all(rows, result, out / "figures") if result.get("ids") else {}
    return write_report(cfg.name, rows, result, figures, out / REPORT_FILE)


def status_lines(cfg: SweepConfig) -> list[str]:
    rows = collect_mod.collect(sweep_dir(cfg), cfg.fit.smoothing)
    return [
        f"{r['status']:9s} {r['id']:42s} step {r.get('last_step') or 0}/{r['steps']}"
        + (f"  loss {r['final_loss']:.4f}" if r.get("final_loss") is not None else "")
        for r in rows
    ]
