"""Run a sweep's points: locally (subprocesses, `jobs` at a time) or as one Slurm array task per
point through the project's launcher (launch/slurm.py renders each point's job script, with its
preemption, requeue and per-rank logs).

Idempotent: a point with a DONE marker is never run again (unless forced); a failed, preempted
or never-started point runs on the next launch, and `only` runs one point alone.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_internvl.sweeps.config import SweepError
from megatron_internvl.sweeps.point import DONE, FAILED

POINT_MODULE = "megatron_internvl.sweeps.point"


def point_status(point_dir: Path) -> str:
    """ "done", "failed", "started" (events or checkpoints, no marker: running, preempted or
    killed) or "pending"."""
    if (point_dir / DONE).is_file():
        return "done"
    if (point_dir / FAILED).is_file():
        return "failed"
    if (point_dir / "tensorboard").is_dir() or (point_dir / "checkpoints").is_dir():
        return "started"
    return "pending"


@dataclass
class Selection:
    run: list[dict[str, Any]]
    """Points to run, in plan order."""
    skipped: list[str]
    """Points left alone because they are done."""


def select(
    sweep: Path, points: list[dict[str, Any]], only: list[str] | None, force: bool
) -> Selection:
    """Which points a launch runs: every point not done (or only `only`); `force` reruns done
    points from scratch."""
    ids = [p["id"] for p in points]
    unknown = sorted(set(only or []) - set(ids))
    if unknown:
        raise SweepError(f"no point(s) {unknown} in this sweep; points: {', '.join(ids)}")
    chosen = [p for p in points if not only or p["id"] in only]
    run, skipped = [], []
    for point in chosen:
        point_dir = sweep / "points" / point["id"]
        if point_status(point_dir) == "done" and not force:
            skipped.append(point["id"])
            continue
        if force:  # from scratch: no resume from the finished run's checkpoint
            for stale in ("checkpoints", "tensorboard", DONE, FAILED):
                path = point_dir / stale
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        run.append(point)
    return Selection(run, skipped)


def point_command(point_dir: Path, nproc: int) -> list[str]:
    torchrun = [sys.executable, "-m", "megatron_internvl.launch.local", "--standalone"]
    return [*torchrun, "--nproc-per-node", str(nproc), "-m", POINT_MODULE, str(point_dir)]


def run_local(sweep: Path, points: list[dict[str, Any]], nproc: int, jobs: int) -> dict[str, int]:
    """Run `points`, `jobs` at a time, each on `nproc` CPU/GPU ranks; returns exit codes by id.
    Output of each goes to <point>/train.log."""
    env = dict(os.environ)
    # Concurrent points share the cores: one thread per rank unless the caller says otherwise.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (jobs * nproc))))
    queue = list(points)
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    codes: dict[str, int] = {}
    total = len(points)
    while queue or running:
        while queue and len(running) < jobs:
            point = queue.pop(0)
            point_dir = sweep / "points" / point["id"]
            log = (point_dir / "train.log").open("a")
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} launch\n")
            log.flush()
            proc = subprocess.Popen(
                point_command(point_dir.resolve(), nproc),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches us; we stop the points we started
            )
            running[point["id"]] = (proc, time.time(), log)
            print(f"started  {point['id']}", flush=True)
        time.sleep(0.2)
        for point_id, (proc, started, log) in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            log.close()
            del running[point_id]
            codes[point_id] = code
            point_dir = sweep / "points" / point_id
            _settle_markers(point_dir, code)
            state = point_status(point_dir)
            print(
                f"{state:8s} {point_id} in {time.time() - started:.1f} s "
                f"({len(codes)}/{total}){'' if code == 0 else f'; see {point_dir}/train.log'}",
                flush=True,
            )
    return codes


def _settle_markers(point_dir: Path, code: int) -> None:
    """A crash the point itself could not record (killed, torchrun failure) still marks FAILED."""
    from megatron_internvl.training.signals import REQUEUE_EXIT_CODE

    if code == 0 and not (point_dir / DONE).is_file():
        (point_dir / FAILED).write_text(json.dumps({"error": "exited 0 without a DONE marker"}))
    elif code not in (0, REQUEUE_EXIT_CODE) and not (point_dir / FAILED).is_file():
        tail = (point_dir / "train.log").read_text()[-4000:]
        (point_dir / FAILED).write_text(json.dumps({"exit_code": code, "log_tail": tail}))


def slurm_scripts(
    sweep: Path,
    name: str,
    points: list[dict[str, Any]],
    cluster_name: str,
    cluster_overrides: list[str],
    max_parallel: int | None,
) -> tuple[str, dict[str, str]]:
    """(array script, {point id: point script}). Each point script is the project launcher's
    rendering for that point's run directory, running this package's point entry instead of
    the plain training task; the array script runs task i's point script."""
    from megatron_internvl.config.validate import RecipeError, layout_of, validate
    from megatron_internvl.launch import slurm
    from megatron_internvl.models.registry import spec_from_dict
    from megatron_internvl.sweeps.plan import _compose

    if not points:
        raise SweepError("no points to submit")
    cluster_args = [f"cluster={cluster_name}", *cluster_overrides]
    cluster_cfg = _compose([*points[0]["overrides"], *cluster_args])
    try:
        cluster = slurm.cluster_config(dict(cluster_cfg.cluster))
        slurm.check_cluster(cluster)
    except slurm.LaunchError as error:
        raise SweepError(f"cluster {cluster_name}: {error}") from None
    scripts: dict[str, str] = {}
    for point in points:
        point_dir = (sweep / "points" / point["id"]).resolve()
        run_cfg = _compose([*point["overrides"], *cluster_args])
        try:
            validate(run_cfg, spec_from_dict(point["spec"]), cluster.tasks)
        except RecipeError as error:
            raise SweepError(f"point {point['id']} on cluster {cluster_name}: {error}") from None
        layout = layout_of(run_cfg)
        dp = cluster.tasks // layout.model_parallel
        layout_text = (
            f"tp{layout.tensor} x pp{layout.pipeline} x cp{layout.context} x dp{dp} = "
            f"{cluster.tasks} ranks"
        )
        script = slurm.render(point["id"], point_dir, [], cluster, layout_text)
        plain = " ".join(
            shlex.quote(c) for c in [cluster.python, "-m", "megatron_internvl.launch.task"]
        )
        ours = " ".join(
            shlex.quote(c) for c in [cluster.python, "-m", POINT_MODULE, str(point_dir)]
        )
        if script.count(plain) != 1:
            raise SweepError(f"the sbatch template no longer runs `{plain}` exactly once")
        scripts[point["id"]] = script.replace(plain, ours)

    header = [
        line
        for line in next(iter(scripts.values())).splitlines()
        if line.startswith("#SBATCH")
        and not line.startswith(("#SBATCH --job-name", "#SBATCH --output"))
    ]
    throttle = f"%{max_parallel}" if max_parallel else ""
    dirs = " ".join(shlex.quote(str((sweep / "points" / p["id"]).resolve())) for p in points)
    array = "\n".join(
        [
            "#!/bin/bash",
            f"# Sweep {name}: one array task per point not yet done "
            "(rendered by megatron_internvl/sweeps/launch.py).",
            f"#SBATCH --job-name=sweep-{name}",
            f"#SBATCH --array=0-{len(points) - 1}{throttle}",
            *header,
            f"#SBATCH --output={(sweep / 'logs').resolve()}/slurm-%A_%a.out",
            f"points=({dirs})",
            'point="${points[$SLURM_ARRAY_TASK_ID]}"',
            'echo "array task ${SLURM_ARRAY_TASK_ID}: ${point}"',
            '[ -f "$point/DONE" ] && { echo "already done"; exit 0; }',
            'exec bash "$point/slurm/point.sbatch"',
            "",
        ]
    )
    return array, scripts


def submit_slurm(sweep: Path, array: str, scripts: dict[str, str]) -> str:
    """Write every point script and the array script, and sbatch the array."""
    from megatron_internvl.launch import slurm

    for point_id, script in scripts.items():
        path = sweep / "points" / point_id / "slurm" / "point.sbatch"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        (path.parent.parent / "logs").mkdir(exist_ok=True)
    (sweep / "logs").mkdir(parents=True, exist_ok=True)
    try:
        return slurm.submit(
            array, sweep / "slurm" / f"array-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
        )
    except slurm.LaunchError as error:
        raise SweepError(str(error)) from None
