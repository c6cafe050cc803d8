"""One sweep point as a training run: `python -m megatron_internvl.sweeps.point <point dir>`,
under torchrun (local sweeps) or srun (one Slurm array task per point).

Runs the project's training entry with the point's overrides (its model shape comes from the
point's spec.json through `model.spec_file`). Rank 0 leaves a marker: DONE when training
returned 0, FAILED otherwise (a preemption, exit 75, leaves neither: the requeued attempt
resumes from its checkpoint).
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
FAILED = "FAILED"


def _write(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)  # a marker is either absent or complete


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m megatron_internvl.sweeps.point <point dir>", file=sys.stderr)
        return 2
    point_dir = Path(args[0])
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        from megatron_internvl.launch.task import slurm_to_torch_env

        os.environ.update(slurm_to_torch_env(dict(os.environ)))
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
    started = time.time()
    try:
        code = train_main(record["overrides"])
    except BaseException:
        if rank0:
            _write(point_dir / FAILED, {"error": traceback.format_exc()[-4000:]})
        raise
    if rank0 and code == 0:
        _write(point_dir / DONE, {"wall_s": round(time.time() - started, 2)})
    elif rank0 and code != REQUEUE_EXIT_CODE:
        _write(point_dir / FAILED, {"exit_code": code})
    return code


if __name__ == "__main__":
    sys.exit(main())
