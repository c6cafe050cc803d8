"""Sweep points as training runs, under torchrun (local sweeps) or srun (one Slurm array task per
point):

    python -m megatron_internvl.sweeps.point <point dir>
    python -m megatron_internvl.sweeps.point --claims <dir> <point dir> [<point dir> ...]

Each point runs the project's training entry with its overrides (its model shape comes from the
point's spec.json through `model.spec_file`). Rank 0 leaves a marker: DONE when training
returned 0 (with the run's wall and CPU seconds), FAILED otherwise (a preemption, exit 75,
leaves neither: the requeued attempt resumes from its checkpoint).

With `--claims`, one process runs point after point (the local launcher starts `launch.jobs` of
them): it takes the next listed point no other worker has claimed (a file created exclusively in
the claims directory), so the points are shared out as workers free up, and the interpreter,
torch and Megatron start once per worker instead of once per point (about 6 CPU-seconds a
point, half the cost of a small CPU point). Each point's output goes to its own train.log. The
world is this process's: every run joins it and leaves it as it found it. A failed point ends
the worker (its ranks may be inside a collective); the launcher starts another for the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

DONE = "DONE"
WORKER_ENV = "MEGATRON_INTERNVL_SWEEP_WORKER"
"""Names the local launcher's worker process in the claims it makes."""
FAILED = "FAILED"


def _write(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)  # a marker is either absent or complete


def run_point(point_dir: Path) -> int:
    """Train one point in this process; returns the training exit code."""
    from megatron_internvl.checkpoint.distributed import latest_committed
    from megatron_internvl.sweeps.plan import POINT_FILE
    from megatron_internvl.train import main as train_main
    from megatron_internvl.training.signals import REQUEUE_EXIT_CODE

    record = json.loads((point_dir / POINT_FILE).read_text())
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        (point_dir / FAILED).unlink(missing_ok=True)
        if latest_committed(point_dir / "checkpoints") is None:
            # A previous attempt that never saved: its events would mix with this run's.
            shutil.rmtree(point_dir / "tensorboard", ignore_errors=True)
    started, cpu_started = time.time(), time.process_time()
    try:
        code = train_main(record["overrides"])
    except BaseException:
        if rank0:
            _write(point_dir / FAILED, {"error": traceback.format_exc()[-4000:]})
        raise
    if rank0 and code == 0:
        cpu_s = time.process_time() - cpu_started  # this rank's process, all its threads
        _write(point_dir / DONE, {"wall_s": round(time.time() - started, 2), "cpu_s": cpu_s})
    elif rank0 and code != REQUEUE_EXIT_CODE:
        _write(point_dir / FAILED, {"exit_code": code})
    return code


def _claim(claims: Path, point_dir: Path) -> bool:
    """Claim a point for this worker; the claim names the worker (WORKER_ENV), so the launcher
    settles only the points of a worker that exited, never another's running point."""
    try:
        fd = os.open(claims / point_dir.name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    try:
        os.write(fd, os.environ.get(WORKER_ENV, "").encode())
    finally:
        os.close(fd)
    return True


def _next_point(claims: Path, candidates: list[Path]) -> Path | None:
    """Rank 0 claims the next free point; every rank of this worker gets the same answer."""
    import torch.distributed as dist

    choice = [None]
    if dist.get_rank() == 0:
        choice[0] = next((str(p) for p in candidates if _claim(claims, p)), None)
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    return None if choice[0] is None else Path(choice[0])


def _to_log(point_dir: Path) -> None:
    """This process's stdout and stderr (and its children's) go to the point's train.log."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(point_dir / "train.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if os.environ.get("RANK", "0") == "0":
        print(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} point {point_dir.name}", flush=True)


def run_claimed(claims: Path, candidates: list[Path]) -> int:
    """Run every candidate point this worker claims, one after another, in one world."""
    import torch
    import torch.distributed as dist

    from megatron_internvl.training.signals import REQUEUE_EXIT_CODE

    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    try:
        while (point_dir := _next_point(claims, candidates)) is not None:
            _to_log(point_dir)
            code = run_point(point_dir)
            if code == REQUEUE_EXIT_CODE:
                return code  # a signal: stop here, the launcher decides what runs next
            if code != 0:
                return code
        return 0
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    claims = None
    if args[:1] == ["--claims"] and len(args) >= 3:
        claims, args = Path(args[1]), args[2:]
    if not args or (claims is None and len(args) != 1):
        print(
            "usage: python -m megatron_internvl.sweeps.point [--claims DIR] <point dir> ...",
            file=sys.stderr,
        )
        return 2
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        from megatron_internvl.launch.task import slurm_to_torch_env

        os.environ.update(slurm_to_torch_env(dict(os.environ)))
    if claims is not None:
        return run_claimed(claims, [Path(a) for a in args])
    return run_point(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
