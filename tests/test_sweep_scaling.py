"""The CPU scaling sweep as a user runs it (recipes/sweep/cpu_scaling.yaml: the generated facts
corpus, 4 LLM sizes x 3 compute budgets, one CPU rank per point, fitted on validation loss)
finds what a scaling-law study is for: a loss minimum inside the sampled model sizes at every
budget, compute-optimal exponents with finite bootstrap intervals, and a parametric L(N, D)
that predicts the held-out (largest-compute) points within the 5% threshold.

It runs the recipe itself, not a reduced copy: only its paths are redirected to tmp_path. Why
this fails when data, FLOPs or fitting regress:
- Data: the optimum sits inside the sizes because the corpus needs capacity (4096 Zipf-
  distributed facts: the small models cannot store the tail, the big ones get too few tokens
  at these budgets). A corpus without that structure (one rule, a handful of facts, or text
  the tokenizer splits differently) puts every minimum at the smallest model and
  `isoflop.budgets[*].status` turns to "minimum outside the sampled sizes".
- FLOPs: a point's steps are its budget over the planned FLOPs per step. Counting those 4x too
  high (exactly what the plan did with train.micro_batch=4 before it counted a micro-batch as
  4 rows) runs every point at a quarter of its budget. Checked by hand: this recipe at budgets
  3.75e10/7.5e10/1.5e11 (a quarter of its own) has its minimum inside the sizes at 1.5e11 only;
  at the two lower budgets it lies below the smallest model, and no N_opt ~ C^a law is fitted.
  Counting too low moves them up and the steps, tokens and FLOPs this test cross-checks in
  results.csv stop adding up.
- Fitting: the minima, the exponents' intervals and the held-out error are read from fit.json,
  which only the fitting code writes.
The sweep's wall and CPU time is printed (`-s`): the recipe's speed is a benchmark, not an
assertion.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_internvl.sweeps.collect import read_table
from megatron_internvl.sweeps.config import compose_sweep

ROOT = Path(__file__).resolve().parents[1]
RECIPE_CORPUS = "runs/sweep_corpus"


def _run(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scaling")
    corpus = _run("-m", "megatron_internvl.sweeps.corpus", "--out", str(tmp / "corpus"))
    assert corpus.returncode == 0, corpus.stderr[-3000:]
    base = compose_sweep("cpu_scaling", []).overrides
    assert sum(RECIPE_CORPUS in o for o in base) == 2  # train and valid shards
    moved = [o.replace(RECIPE_CORPUS, str(tmp / "corpus")) for o in base]
    items = ",".join(f"'{o}'" for o in moved)
    began = time.time()
    result = _run(
        "tools/sweep.py", "run", "cpu_scaling", f"output_dir={tmp}", f"overrides=[{items}]"
    )
    print(f"\ncpu_scaling sweep: {time.time() - began:.0f} s wall")
    print("\n".join(line for line in result.stdout.splitlines() if " points in " in line))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / "cpu_scaling"


def test_every_point_spends_its_budget_on_validation_loss(sweep):
    rows = read_table(sweep / "results.csv")
    assert len(rows) == 12 and {r["status"] for r in rows} == {"done"}
    for r in rows:
        assert abs(r["flops"] - r["budget"]) <= r["flops"] / r["steps"]  # to within a step
        assert r["tokens"] == r["steps"] * r["global_batch"] * r["seq_length"]
        assert r["valid_loss"] is not None and math.isfinite(r["valid_loss"])
    fit = json.loads((sweep / "fit.json").read_text())
    assert fit["loss"] == "valid_loss"


def test_the_isoflop_minima_lie_inside_the_sizes_at_every_budget(sweep):
    fit = json.loads((sweep / "fit.json").read_text())
    budgets = fit["isoflop"]["budgets"]
    assert len(budgets) == 3
    for entry in budgets:
        assert entry["status"] == "ok", entry
        sizes = [
            n
            for n, r in zip(fit["sizes"], read_table(sweep / "results.csv"), strict=True)
            if r["budget"] == entry["budget"]
        ]
        assert min(sizes) < entry["N_opt"] < max(sizes)
    # More compute, bigger optimal model trained on more tokens.
    n_opt = [e["N_opt"] for e in budgets]
    d_opt = [e["D_opt"] for e in budgets]
    assert n_opt[0] < n_opt[-1] and d_opt[0] < d_opt[-1]


def test_the_exponents_have_finite_intervals_and_the_law_predicts_held_out_points(sweep):
    fit = json.loads((sweep / "fit.json").read_text())
    iso = fit["isoflop"]
    assert iso["status"] == "ok"
    for key in ("a_N_opt", "b_D_opt"):
        e = iso[key]
        assert all(math.isfinite(e[k]) for k in ("value", "low", "high")), e
        assert e["low"] < e["value"] < e["high"]
    # Both positive, and summing to about 1 as C ~ N x D does at these sizes.
    assert 0 < iso["a_N_opt"]["value"] < 1 and 0 < iso["b_D_opt"]["value"] < 1.5
    assert iso["a_N_opt"]["value"] + iso["b_D_opt"]["value"] == pytest.approx(1.0, abs=0.15)
    held = fit["parametric"]["heldout"]
    assert held["n_points"] >= 2
    assert held["within_threshold"] and held["max_relative_error"] < 0.05
    report = (sweep / "report.md").read_text()
    assert "validation loss" in report
    for figure in ("loss_vs_compute", "isoflop", "predicted_vs_observed"):
        assert (sweep / "figures" / f"{figure}.png").stat().st_size > 20_000
