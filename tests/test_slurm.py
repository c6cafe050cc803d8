"""On a real one-node Slurm: the CPU demo recipe submitted as a 2-task job through the launcher is
signalled mid-run, saves, requeues itself, resumes, and ends with the uninterrupted run's losses."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (fixture)
from tests.test_training import STEPS, _losses, _run

ROOT = Path(__file__).resolve().parents[1]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_preempted_job_requeues_and_finishes_with_the_same_losses(slurm_cluster, tmp_path):  # noqa: F811
    env = {**slurm_cluster, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    straight = _run(tmp_path, "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    expected = _losses(tmp_path, "straight")

    submitted = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_internvl.launch",
            "recipe=demo_cpu",
            "cluster=local_cpu",  # python: null -> this venv's interpreter
            f"output_dir={tmp_path}",
            "name=onslurm",
            f"train.steps={STEPS}",
            "logging.log_every=1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    job = re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1)
    (script,) = (tmp_path / "onslurm" / "slurm").glob("*.sbatch")
    assert f"{sys.executable} -m megatron_internvl.launch.task" in script.read_text()
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    logs = tmp_path / "onslurm" / "logs"
    rank0 = logs / f"job{job}-attempt0" / "rank0.log"
    _wait_for(lambda: rank0.is_file() and "step      4 |" in rank0.read_text(), 180, "step 4")
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)

    def job_gone() -> bool:
        out = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True)
        return out.stdout.strip() == ""

    _wait_for(job_gone, 300, "the job to requeue and finish")
    batch_log = (logs / f"slurm-{job}.out").read_text()
    assert "training exited with 0" not in batch_log.split("requeueing")[0]
    assert "requeueing (attempt 1 of 3)" in batch_log
    assert "training exited with 0" in batch_log
    resumed = (logs / f"job{job}-attempt1" / "rank0.log").read_text()
    assert "resumed from" in resumed
    assert _losses(tmp_path, "onslurm") == expected  # every step, bit for bit
