"""Bring up the distributed runtime of one rank: the backend, the platform, the process groups.

Launchers (torchrun, srun) set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
On GPUs each rank takes the device LOCAL_RANK and talks NCCL; on CPU-only hosts ranks talk gloo
and the CPU platform module makes Megatron-Core run there.
"""

from __future__ import annotations

import os
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
