"""A real IsoFLOP mini-sweep on CPU goes launch -> collect -> fit -> figures + report; collect
reads what the runs logged; a finished point is never run again, and a failed point re-runs
alone."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet
import pytest

from megatron_internvl.sweeps.collect import read_table
from tests.sweep_cases import cpu_mini_args, demo_shards

ROOT = Path(__file__).resolve().parents[1]


def _sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/sweep.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def _logged_losses(point_dir: Path) -> dict[int, float]:
    """The console lines the training loop printed (4 decimals): an oracle independent of
    TensorBoard."""
    text = (point_dir / "train.log").read_text()
    return {int(s): float(v) for s, v in re.findall(r"^step +(\d+) \| loss ([\d.]+)", text, re.M)}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    args = [
        "cpu_mini",
        *cpu_mini_args(tmp, demo_shards(tmp / "shards")),
        "models.llm.depth=[0.25,0.5,1]",  # 3 sizes x 2 budgets = 6 runs (the README runs 12)
        "budgets=[2e10,4e10]",
        "fit.bootstrap=20",
    ]
    result = _sweep("run", *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / "cpu_mini", args, result.stdout


def test_the_sweep_runs_every_point_and_fits_and_draws(sweep):
    out, _, stdout = sweep
    assert "6 to run, 0 already done" in stdout
    rows = read_table(out / "results.csv")
    assert [r["status"] for r in rows] == ["done"] * 6
    # The Parquet copy holds the same table (typed columns, values equal to the CSV's).
    assert pyarrow.parquet.read_table(out / "results.parquet").to_pylist() == rows
    for budget in (2e10, 4e10):
        points = [r for r in rows if r["budget"] == budget]
        assert len(points) == 3
        for r in points:  # IsoFLOP: every point spends its budget, to within a step
            assert abs(r["flops"] - budget) <= r["flops"] / r["steps"]
    # Tokens and compute trade against each other within a budget: bigger model, fewer tokens.
    small, _, big = sorted((r for r in rows if r["budget"] == 2e10), key=lambda r: r["N"])
    assert small["tokens"] > big["tokens"] and small["N"] < big["N"]
    fit = json.loads((out / "fit.json").read_text())
    assert fit["status"] == "ok" and len(fit["ids"]) == 6
    assert fit["compute_law"]["status"] == "ok"
    assert fit["parametric"]["status"] == "ok"  # 6 points for 5 constants
    assert len(fit["isoflop"]["budgets"]) == 2
    report = (out / "report.md").read_text()
    for figure in ("loss_vs_compute", "isoflop", "predicted_vs_observed"):
        png = out / "figures" / f"{figure}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
        assert f"](figures/{figure}.png)" in report


def test_collect_reads_what_each_run_logged(sweep):
    out, _, _ = sweep
    for r in read_table(out / "results.csv"):
        point = out / "points" / r["id"]
        printed = _logged_losses(point)
        assert sorted(printed) == list(range(1, r["steps"] + 1))
        assert r["last_step"] == r["steps"]
        assert r["final_loss"] == pytest.approx(printed[r["steps"]], abs=5e-5)
        assert r["min_loss"] == pytest.approx(min(printed.values()), abs=5e-5)
        assert r["tokens"] == r["steps"] * r["global_batch"] * r["seq_length"] == r["steps"] * 512
        config = json.loads((point / "config.json").read_text())
        assert config["train"]["steps"] == r["steps"]
        trained = json.loads(Path(config["model"]["spec_file"]).read_text())  # the run's shape
        assert trained["language"]["num_layers"] == r["llm_layers"]
        assert trained["vision"]["hidden_size"] == r["vit_hidden"]


def test_finished_points_are_skipped_and_a_failed_point_reruns_alone(sweep):
    out, args, _ = sweep
    rows = {r["id"]: r for r in read_table(out / "results.csv")}
    done_before = {p: (out / "points" / p / "DONE").stat().st_mtime_ns for p in rows}

    again = _sweep("launch", *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 to run, 6 already done" in again.stdout
    assert {p: (out / "points" / p / "DONE").stat().st_mtime_ns for p in rows} == done_before

    # A real failure: the point's data vanishes mid-sweep.
    victim = sorted(rows)[0]
    point = out / "points" / victim
    record = json.loads((point / "point.json").read_text())
    (point / "DONE").unlink()
    for stale in ("checkpoints", "tensorboard"):  # as a first attempt that never got far
        shutil.rmtree(point / stale)
    broken = dict(record, overrides=[*record["overrides"], f"data.shards=[{out}/missing]"])
    (point / "point.json").write_text(json.dumps(broken))
    from megatron_internvl.sweeps.launch import run_local

    assert run_local(out, [broken], nproc=1, jobs=1)[victim] != 0
    assert (point / "FAILED").is_file() and not (point / "DONE").exists()
    (point / "point.json").write_text(json.dumps(record, indent=1))
    status = _sweep("status", *args)
    assert re.search(rf"^failed +{re.escape(victim)}", status.stdout, re.M), status.stdout

    rerun = _sweep("launch", *args, "--only", victim)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "1 to run, 0 already done" in rerun.stdout
    assert re.findall(r"^done +(\S+)", rerun.stdout, re.M) == [victim]
    assert not (point / "FAILED").exists()
    others = {p: (out / "points" / p / "DONE").stat().st_mtime_ns for p in rows if p != victim}
    assert others == {p: t for p, t in done_before.items() if p != victim}
    # The re-run is the same training run: the same losses as the first time.
    collect = _sweep("collect", *args)
    assert collect.returncode == 0, collect.stderr[-2000:]
    after = {r["id"]: r for r in read_table(out / "results.csv")}
    assert after[victim]["status"] == "done"
    assert after[victim]["final_loss"] == pytest.approx(rows[victim]["final_loss"], abs=1e-4)
