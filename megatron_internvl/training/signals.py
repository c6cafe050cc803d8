"""Preemption signals: every rank finishes its step, saves, and exits with REQUEUE_EXIT_CODE.

A signal reaches ranks at different moments (or only some of them), so the decision is agreed:
each step the local flag is all-reduced with MAX over the whole world before anyone acts.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75
"""Exit status meaning "saved after a preemption signal; requeue me" (EX_TEMPFAIL)."""

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

REQUEUE_FILE_ENV = "MEGATRON_INTERNVL_REQUEUE_FILE"
"""If set, rank 0 also writes this file after the save, before exiting with REQUEUE_EXIT_CODE:
under `srun --kill-on-bad-exit` the first rank to exit gets the others killed, so srun's own
status may read "terminated" rather than 75; the file is what the batch script trusts."""


class SignalWatcher:
    """Records SIGTERM/SIGUSR1 instead of dying; `agreed()` tells every rank the same."""

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> None:
        self.received: signal.Signals | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def agreed(self) -> bool:
        """Collective: True on every rank if any rank received a signal."""
        # current_device(): the GPU under NCCL, the CPU under the CPU platform.
        flag = torch.tensor([1.0 if self.received else 0.0], device=torch.cuda.current_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
