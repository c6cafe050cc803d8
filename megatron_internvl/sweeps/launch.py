"""Run a sweep's points: locally (subprocesses, `jobs` at a time) or as one Slurm array task per
point through the project's launcher (launch/slurm.py renders each point's job script, with its
preemption, requeue and per-rank logs).

Idempotent: a point with a DONE marker is never run again (unless forced); a failed, preempted
or never-started point runs on the next launch, and `only` runs one point alone.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_internvl.sweeps.config import SweepError
from megatron_internvl.sweeps.point import DONE, FAILED, WORKER_ENV

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
    """The command that trains one point alone on `nproc` local ranks."""
    return worker_command([point_dir], nproc)


def worker_command(point_dirs: list[Path], nproc: int, claims: Path | None = None) -> list[str]:
    torchrun = [sys.executable, "-m", "megatron_internvl.launch.local", "--standalone"]
    ours = [*(["--claims", str(claims)] if claims else []), *map(str, point_dirs)]
    return [*torchrun, "--nproc-per-node", str(nproc), "-m", POINT_MODULE, *ours]


def run_local(sweep: Path, points: list[dict[str, Any]], nproc: int, jobs: int) -> dict[str, int]:
    """Run `points` on `jobs` workers of `nproc` CPU/GPU ranks each; returns exit codes by id.
    A worker trains point after point in one process (sweeps/point.py: the next point no
    worker has claimed yet), so start-up is paid once per worker; a worker that ends on a
    failed point is replaced while points are left. Output of each point goes to
    <point>/train.log, a worker's own to <sweep>/logs/worker-<n>.log."""
    env = dict(os.environ)
    # Concurrent workers share the cores: one thread per rank unless the caller says otherwise.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (jobs * nproc))))
    dirs = {p["id"]: (sweep / "points" / p["id"]).resolve() for p in points}
    for point_dir in dirs.values():  # a marker of an earlier attempt is not this one's result
        (point_dir / FAILED).unlink(missing_ok=True)
    claims = sweep / "logs" / f"claims-{os.getpid()}-{time.time_ns()}"
    claims.mkdir(parents=True)
    interrupted = False
    running: list[tuple[subprocess.Popen, Any, str]] = []
    codes: dict[str, int] = {}
    cpu_total, began, started = 0.0, time.time(), 0
    try:
        while True:
            free = [i for i in dirs if not (claims / i).exists()]
            while free and not interrupted and len(running) < min(jobs, len(free)):
                started += 1
                log = (sweep / "logs" / f"worker-{started}.log").open("a")
                command = worker_command(list(dirs.values()), nproc, claims)
                # A session of its own: Ctrl-C reaches us; we stop the workers we started.
                worker = str(started)
                proc = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**env, WORKER_ENV: worker},
                    start_new_session=True,
                )
                running.append((proc, log, worker))
            time.sleep(0.2)
            _report_finished(dirs, claims, codes, len(points))
            for proc, log, worker in list(running):
                before = _children_cpu_s()
                code = proc.poll()
                if code is None:
                    continue
                # Reaping is sequential: the delta is this worker's whole process tree.
                cpu_total += _children_cpu_s() - before
                log.close()
                running.remove((proc, log, worker))
                interrupted |= _settle_worker(dirs, claims, codes, code, worker)
            if not running and (interrupted or all((claims / i).exists() for i in dirs)):
                break
        _report_finished(dirs, claims, codes, len(points))
    finally:
        shutil.rmtree(claims, ignore_errors=True)
    if codes:
        elapsed = time.time() - began
        print(
            f"{len(codes)} points in {elapsed:.1f} s, cpu {cpu_total:.1f} s "
            f"({started} worker process(es), start-up included)",
            flush=True,
        )
    return codes


def _report_finished(
    dirs: dict[str, Path], claims: Path, codes: dict[str, int], total: int
) -> None:
    """Print each claimed point once its marker appears: its wall and CPU time."""
    for point_id, point_dir in dirs.items():
        if point_id in codes or not (claims / point_id).exists():
            continue
        state = point_status(point_dir)
        if state not in ("done", "failed"):
            continue
        codes[point_id] = 0 if state == "done" else 1
        times = ""
        if state == "done":
            record = json.loads((point_dir / DONE).read_text())
            times = f" in {record['wall_s']:.1f} s (cpu {record.get('cpu_s', math.nan):.1f} s)"
        tail = "" if state == "done" else f"; see {point_dir}/train.log"
        print(f"{state:8s} {point_id}{times} ({len(codes)}/{total}){tail}", flush=True)


def _settle_worker(
    dirs: dict[str, Path], claims: Path, codes: dict[str, int], code: int, worker: str
) -> bool:
    """After a worker exits, the point it was in (claimed by it, no marker) is FAILED, unless a
    signal stopped it (REQUEUE_EXIT_CODE: resumable; returns True: start no more workers).
    Points other workers claimed are still running: they are left alone."""
    from megatron_internvl.training.signals import REQUEUE_EXIT_CODE

    for point_id, point_dir in dirs.items():
        claim = claims / point_id
        if point_id in codes or not claim.exists() or claim.read_text() != worker:
            continue
        if point_status(point_dir) in ("started", "pending"):
            if code == REQUEUE_EXIT_CODE:
                codes[point_id] = code
                print(f"stopped  {point_id} by a signal; launch again to resume", flush=True)
            else:
                _settle_markers(point_dir, code)
    return code == REQUEUE_EXIT_CODE


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _settle_markers(point_dir: Path, code: int) -> None:
    """A crash the point itself could not record (killed, torchrun failure) still marks FAILED."""
    from megatron_internvl.training.signals import REQUEUE_EXIT_CODE

    if code == 0 and not (point_dir / DONE).is_file():
        (point_dir / FAILED).write_text(json.dumps({"error": "exited 0 without a DONE marker"}))
    elif code not in (0, REQUEUE_EXIT_CODE) and not (point_dir / FAILED).is_file():
        log = point_dir / "train.log"
        tail = log.read_text()[-4000:] if log.is_file() else "(no train.log)"
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
