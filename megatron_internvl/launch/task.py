"""One training task under srun: Slurm's task variables -> torch's, then the training entry.

srun starts one task per GPU; torch.distributed reads RANK/WORLD_SIZE/LOCAL_RANK (MASTER_ADDR and
MASTER_PORT come from the batch script). The exit status is training's: 0, or
REQUEUE_EXIT_CODE after a preemption signal.
"""

from __future__ import annotations

import os
import sys


def slurm_to_torch_env(environ: dict[str, str]) -> dict[str, str]:
    """The torch.distributed variables for this Slurm task."""
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ["SLURM_LOCALID"],
        "LOCAL_WORLD_SIZE": environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0],
    }


def main() -> int:
    os.environ.update(slurm_to_torch_env(dict(os.environ)))
    if os.environ.get("MASTER_ADDR"):  # rank 0's store listens there only, not on every interface
        import socket

        from megatron_internvl.launch.local import bind_stores

        bind_stores(socket.gethostbyname(os.environ["MASTER_ADDR"]))
    from megatron_internvl.train import main as train_main

    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
