"""A sweep through Hydra multirun on a real one-node Slurm cluster (tests/slurm_cluster.py), with
the project's launcher (one array task per point, each the project's job script; one task is
preempted mid-run, saves, requeues and resumes) and with Hydra's submitit launcher (one array
task per point, each task one training rank); both give the same losses, bit for bit, as the
same points run locally by Hydra's basic launcher."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_internvl.sweeps.collect import collect
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (fixture)
from tests.sweep_cases import ROOT, cpu_mini_args, demo_shards

RANKS = 2  # each point trains on two ranks (data parallel), locally and on Slurm


def _sweep_args(out: Path, shards: Path) -> list[str]:
    return [
        "--config-name",
        "cpu_mini",
        *cpu_mini_args(out, shards),
        "models.llm.depth=[0.25,0.5]",
        "budgets=[2e10]",
        f"launch.nproc={RANKS}",
    ]


def _multirun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_internvl.sweeps.app", "--multirun", *args],
        cwd=ROOT,
        env={**env, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _final_losses(sweep: Path) -> dict[str, float]:
    rows = collect(sweep)
    assert [r["status"] for r in rows] == ["done"] * len(rows), rows
    return {r["id"]: r["final_loss"] for r in rows}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The two points run here by Hydra's own basic launcher (one after the other)."""
    tmp = tmp_path_factory.mktemp("local")
    shards = demo_shards(tmp / "shards")
    result = _multirun([*_sweep_args(tmp, shards), "hydra/launcher=basic"], os.environ)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 to run, 0 already done" in result.stdout
    # Hydra's launcher wrote each job's composed config under the sweep's hydra/ directory.
    for point in (tmp / "cpu_mini" / "points").iterdir():
        assert (tmp / "cpu_mini" / "hydra" / point.name / ".hydra" / "config.yaml").is_file()
    return shards, _final_losses(tmp / "cpu_mini")


def _wait_until_gone(job: str, env: dict[str, str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True)
        if queue.returncode == 0 and not queue.stdout.strip():
            return
        time.sleep(2)
    raise AssertionError(f"Slurm job {job} still queued or running after {timeout} s")


def test_project_launcher_runs_one_slurm_array_task_per_point(slurm_cluster, local, tmp_path):  # noqa: F811
    shards, expected = local
    args = [
        *_sweep_args(tmp_path, shards),
        "launch.backend=slurm",
        "launch.cluster=local_cpu",
        f"launch.cluster_overrides=['cluster.python={sys.executable}']",
    ]
    submitted = _multirun(args, slurm_cluster)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job = re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1)
    sweep = tmp_path / "cpu_mini"
    # Preempt array task 0 mid-run: its ranks save, the task requeues itself and the next
    # attempt resumes from that checkpoint.
    task_log = sweep / "logs" / f"slurm-{job}_0.out"
    deadline = time.monotonic() + 300

    def point_of_task_0() -> Path | None:
        found = task_log.is_file() and re.search(r"array task 0: (\S+)", task_log.read_text())
        return Path(found.group(1)) if found else None

    def at_step_4(point: Path) -> bool:
        logs = list(point.glob("logs/job*-attempt0/rank0.log"))
        return bool(logs) and re.search(r"step +4 \|", logs[0].read_text()) is not None

    while (first := point_of_task_0()) is None or not at_step_4(first):
        assert time.monotonic() < deadline, "array task 0 never reached step 4"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", f"{job}_0"], env=slurm_cluster, check=True)
    _wait_until_gone(job, slurm_cluster, 400)
    for task in (0, 1):  # one array task per point, each ran its point's srun job script
        log = (sweep / "logs" / f"slurm-{job}_{task}.out").read_text()
        assert f"array task {task}:" in log and "training exited with 0" in log, log[-2000:]
        assert ("requeueing (attempt 1 of 3)" in log) == (task == 0), log[-2000:]
    [resumed] = first.glob("logs/job*-attempt1/rank0.log")
    assert "resumed from" in resumed.read_text()
    assert _final_losses(sweep) == expected  # the preempted point too, bit for bit

    again = _multirun(args, slurm_cluster)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 to run, 2 already done" in again.stdout
    assert "Submitted batch job" not in again.stdout


def test_submitit_launcher_runs_the_points_as_slurm_array_tasks(slurm_cluster, local, tmp_path):  # noqa: F811
    shards, expected = local
    args = [
        *_sweep_args(tmp_path, shards),
        "hydra/launcher=submitit_slurm",
        f"hydra.launcher.submitit_folder={tmp_path}/submitit/%j",
        f"hydra.launcher.tasks_per_node={RANKS}",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
        # One thread per rank, as the project's job script sets: the CPU's reduction order,
        # hence the last bits of the losses, depends on it.
        "hydra.launcher.setup=['export OMP_NUM_THREADS=1']",
    ]
    result = _multirun(args, slurm_cluster)  # Hydra waits for the array to finish
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = [p.name for p in (tmp_path / "submitit").iterdir()]
    tasks = sorted(n for n in names if re.fullmatch(r"\d+_\d+", n))  # <array id>_<task>
    assert len({t.split("_")[0] for t in tasks}) == 1 and len(tasks) == 2, names
    assert _final_losses(tmp_path / "cpu_mini") == expected
