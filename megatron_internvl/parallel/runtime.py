"""Bring up the distributed runtime of one rank: the backend, the platform, the process groups.

Launchers (torchrun, srun) set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
On GPUs each rank takes the device LOCAL_RANK and talks NCCL; on CPU-only hosts ranks talk gloo
and the CPU platform module makes Megatron-Core run there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_internvl.parallel import cpu_platform
from megatron_internvl.parallel.layout import ParallelLayout


def initialize(layout: ParallelLayout, seed: int, timeout_s: float = 600.0) -> None:
    """Join the world started by the launcher and create `layout`'s process groups."""
    on_cpu = cpu_platform.install()
    if not on_cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("gloo" if on_cpu else "nccl", timeout=timedelta(seconds=timeout_s))
    layout.initialize()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def adapt_model_config(config: Any) -> Any:
    """Platform adjustments to a Megatron model config (none on GPUs)."""
    return cpu_platform.adapt_model_config(config)


def shutdown() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def single_process(layout: ParallelLayout | None = None, seed: int = 1234) -> Iterator[None]:
    """This process as a one-rank world (for tools that build models without a launcher)."""
    if dist.is_initialized():
        raise RuntimeError("single_process() needs a process without a distributed world")
    installed = cpu_platform.install()
    dist.init_process_group(
        "gloo" if installed or not torch.cuda.is_available() else "nccl",
        store=dist.HashStore(),
        rank=0,
        world_size=1,
    )
    try:
        (layout or ParallelLayout()).initialize()
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        yield
    finally:
        shutdown()
        if installed:
            cpu_platform.uninstall()
