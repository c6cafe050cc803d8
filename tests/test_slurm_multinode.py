"""On a real 2-node Slurm cluster (network namespaces, tests/slurm_multinode.py), the CPU demo
recipe submitted through `python -m megatron_internvl.launch` as 2 nodes x 2 tasks (TP=2 within a
node, DP=2 across nodes; the rendezvous is the first node, by host name, as the job script
computes it):

- trains with exactly the losses of the same layout run on one machine by torchrun;
- survives losing a node mid-run: Slurm declares the node failed and requeues the job
  (`--requeue`), which resumes from the last committed checkpoint when the node returns, logs the
  steps lost, and redoes them with exactly the uninterrupted run's losses;
- survives preemption: the signal reaches the tasks on both nodes, every rank saves, the job
  requeues itself once and resumes exactly.

Losses are read with TensorBoard's own reader. 12 min on a 2-core box shared with other jobs
(load ~50): the one-machine reference 87 s, the three jobs 140, 247 and 222 s.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_internvl.checkpoint.distributed import COMMIT_MARKER, committed_steps
from tests.slurm_multinode import MultiNodeCluster, slurm_multinode  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
SAVE_EVERY = 4  # the node is lost right after step 5: three steps before the next save
RANKS = 4  # 2 nodes x 2 tasks; the demo recipe's TP=2 leaves DP=2, across the nodes


def _overrides(out: Path, name: str) -> list[str]:
    return [
        "recipe=demo_cpu",
        f"name={name}",
        f"output_dir={out}",
        f"parallel.gpus={RANKS}",
        f"train.steps={STEPS}",
        f"checkpoint.save_every={SAVE_EVERY}",
        "checkpoint.keep_last=0",  # keep every checkpoint for the checks
        "logging.log_every=1",
    ]


def _env(base: dict[str, str]) -> dict[str, str]:
    return {**base, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}


def _losses(events: Path) -> dict[int, float]:
    """train/loss by step, from an event file or a directory of them."""
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {e.step: e.value for e in accumulator.Scalars("train/loss")}


def _attempt_losses(out: Path, name: str) -> list[dict[int, float]]:
    """Per attempt (event files in the order they were opened), train/loss by step."""
    files = sorted((out / name / "tensorboard").glob("events.out.tfevents.*"))
    return [_losses(path) for path in sorted(files, key=lambda p: int(p.name.split(".")[3]))]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> dict[int, float]:
    """The same layout on this machine, without Slurm: 4 ranks by torchrun."""
    out = tmp_path_factory.mktemp("one_node")
    torchrun = [sys.executable, "-m", "megatron_internvl.launch.local", "--standalone"]
    result = subprocess.run(
        [
            *torchrun,
            f"--nproc-per-node={RANKS}",
            "-m",
            "megatron_internvl.train",
            *_overrides(out, "reference"),
        ],
        cwd=ROOT,
        env=_env(dict(os.environ)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = _losses(out / "reference" / "tensorboard")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _submit(cluster: MultiNodeCluster, out: Path, name: str) -> str:
    submitted = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_internvl.launch",
            "cluster=local_cpu",
            "cluster.nodes=2",
            f"cluster.python={sys.executable}",
            *_overrides(out, name),
        ],
        cwd=ROOT,
        env=_env(cluster.env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr[-2000:]
    assert (
        "tp2 x pp1 x cp1 x dp2 = 4 ranks (2 nodes x 2 per node)"
        in Path(re.search(r"script: (\S+)", submitted.stdout).group(1)).read_text()
    )
    return re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1)


def _wait_for(
    predicate, timeout: float, what: str, cluster: MultiNodeCluster, every: float = 1
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; nodes {cluster.node_states()}")


def _logged(path: Path, step: int) -> bool:
    return path.is_file() and f"step {step:6d} |" in path.read_text(errors="replace")


def _gone(cluster: MultiNodeCluster, job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job], env=cluster.env, capture_output=True)
    return out.stdout.strip() == b""


def _all_committed(out: Path, name: str) -> None:
    """Nothing half-written is left: every checkpoint directory carries its commit marker."""
    dirs = sorted((out / name / "checkpoints").glob("step_*"))
    assert dirs and all((d / COMMIT_MARKER).is_file() for d in dirs), dirs


def test_two_node_run_equals_one_node(slurm_multinode, one_node, tmp_path):  # noqa: F811
    cluster = slurm_multinode
    job = _submit(cluster, tmp_path, "straight")
    _wait_for(lambda: _gone(cluster, job), 600, "the job to finish", cluster)
    logs = tmp_path / "straight" / "logs"
    batch = (logs / f"slurm-{job}.out").read_text()
    assert f"job {job} attempt 0 on n[1-2]" in batch
    assert "training exited with 0" in batch, batch[-3000:]
    assert sorted(p.name for p in (logs / f"job{job}-attempt0").glob("rank*.log")) == [
        f"rank{r}.log" for r in range(RANKS)
    ]
    for node in cluster.nodes:  # each node's slurmd started the training step's tasks
        assert f"launch task StepId={job}.0 request" in cluster.slurmd_log(node), node
    assert _losses(tmp_path / "straight" / "tensorboard") == one_node  # bit for bit


def test_lost_node_requeues_and_resumes_exactly(slurm_multinode, one_node, tmp_path):  # noqa: F811
    cluster = slurm_multinode
    job = _submit(cluster, tmp_path, "nodeloss")
    logs = tmp_path / "nodeloss" / "logs"
    rank0 = logs / f"job{job}-attempt0" / "rank0.log"
    # Steps take ~0.3 s on an idle box: look often, so the node dies before the next save.
    _wait_for(lambda: _logged(rank0, SAVE_EVERY + 1), 600, "step 5", cluster, every=0.05)
    cluster.lose_node("n2")

    def requeued() -> bool:
        state = cluster.job(job)
        return state["JobState"] == "PENDING" and state["Restarts"] == "1"

    _wait_for(requeued, 120, "Slurm to requeue the job after the node failure", cluster)
    assert "DUE TO NODE FAILURE" in (logs / f"slurm-{job}.out").read_text()
    committed = committed_steps(tmp_path / "nodeloss" / "checkpoints")  # what a resume can use
    cluster.return_node("n2")
    _wait_for(lambda: _gone(cluster, job), 600, "the resumed job to finish", cluster)

    batch = (logs / f"slurm-{job}.out").read_text()
    assert "requeueing" not in batch  # Slurm requeued it, not the script
    assert "training exited with 0" in batch, batch[-3000:]
    interrupted, resumed = _attempt_losses(tmp_path, "nodeloss")
    reached, restart = max(interrupted), committed[-1]
    assert restart < reached
    resume_line = f"resumed from {tmp_path / 'nodeloss' / 'checkpoints'}/step_{restart:08d}"
    resumed_log = (logs / f"job{job}-attempt1" / "rank0.log").read_text()
    assert (
        f"{resume_line} at step {restart}; steps lost: {reached - restart} "
        f"(the previous attempt logged step {reached})" in resumed_log
    )
    assert interrupted == {s: one_node[s] for s in range(1, reached + 1)}
    assert resumed == {s: one_node[s] for s in range(restart + 1, STEPS + 1)}  # bit for bit
    _all_committed(tmp_path, "nodeloss")


def test_preempted_two_node_job_requeues_once_and_resumes(slurm_multinode, one_node, tmp_path):  # noqa: F811
    cluster = slurm_multinode
    job = _submit(cluster, tmp_path, "preempted")
    logs = tmp_path / "preempted" / "logs"
    rank0 = logs / f"job{job}-attempt0" / "rank0.log"
    _wait_for(lambda: _logged(rank0, 1), 600, "step 1", cluster, every=0.05)
    # What `#SBATCH --signal=USR1@<s>` does before the time limit: signal every task of the job.
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster.env, check=True)
    _wait_for(lambda: _gone(cluster, job), 600, "the job to requeue and finish", cluster)

    for node in cluster.nodes:  # Slurm's own record: SIGUSR1 sent to both ranks on each node
        signalled = re.findall(
            rf"\[{job}\.0\] proctrack/linuxproc: _kill_proclist: Sending signal 10 to pid (\d+) "
            r"\(python",
            cluster.slurmd_log(node),
        )
        assert len(set(signalled)) >= 2, (node, signalled)
    batch = (logs / f"slurm-{job}.out").read_text()
    assert batch.count("requeueing (attempt") == 1
    assert "requeueing (attempt 1 of 3)" in batch and "training exited with 0" in batch
    saved = int(re.search(r"signal received: saved at step (\d+)", rank0.read_text()).group(1))
    assert saved < STEPS
    checkpoint = tmp_path / "preempted" / "checkpoints" / f"step_{saved:08d}"
    assert sorted(p.name for p in checkpoint.glob("rank_*.pt")) == [  # every rank saved
        f"rank_{r:05d}.pt" for r in range(RANKS)
    ]
    resumed_log = (logs / f"job{job}-attempt1" / "rank0.log").read_text()
    assert f"at step {saved}; steps lost: 0 " in resumed_log
    first, second = _attempt_losses(tmp_path, "preempted")
    assert first == {s: one_node[s] for s in range(1, saved + 1)}
    assert second == {s: one_node[s] for s in range(saved + 1, STEPS + 1)}  # bit for bit
    assert cluster.job(job)["Restarts"] == "1"
    _all_committed(tmp_path, "preempted")
