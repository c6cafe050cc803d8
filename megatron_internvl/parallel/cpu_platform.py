"""Run Megatron-Core on CPU ranks (gloo): the one place that knows a machine may lack CUDA.

Megatron-Core is written for GPUs and assumes CUDA in a handful of places. On a CPU-only host
(every developer machine and CI here) `install()` resolves each of them; when CUDA is available it
does nothing at all and returns False, so GPU runs execute Megatron-Core untouched.

What each piece resolves, and why it is needed:

1. **Current device.** Buffers (global memory buffer, TP all-gather outputs, p2p receive
   buffers, RoPE frequencies) are allocated on `torch.cuda.current_device()`. It resolves to
   the CPU device.
2. **Model-parallel RNG tracker.** `tensor_parallel.random` forks named CUDA generator states
   around dropout and TP weight init; without a CUDA generator it fails with "cuda rng state
   model-parallel-rng is not added". The CUDA RNG calls (`torch.cuda.get_rng_state`,
   `set_rng_state`, `manual_seed` and Megatron's private `_get/_set_cuda_rng_state`) map to the
   CPU default generator, which is what CPU dropout draws from. `torch.manual_seed` itself calls
   `torch.cuda.manual_seed_all`, so the replacements seed `torch.default_generator` directly and
   never recurse. Megatron's fork warns "CPU RNG state changed within GPU RNG context" on every
   fork, which is expected when both are one generator; that log record is filtered out.
3. **Hard-coded CUDA tensors.** Schedules, optimizers, DDP buffers, grad clipping and
   dist_checkpointing create tensors with `device="cuda"` or call `.cuda()`. A torch function
   mode rewrites CUDA device arguments to the CPU and makes `.cuda()` a no-op.
4. **Streams, events and synchronize.** The pipeline schedules and DDP call
   `torch.cuda.synchronize`, `Stream`, `Event` and `stream()`. On CPU every op is synchronous,
   so they become no-ops with the same interface.
5. **Tensor type checks.** The distributed optimizer and `clip_grads` dispatch on
   `param.type()` being `torch.cuda.FloatTensor` (and Half/BFloat16). The mode reports CPU
   floating tensors under those names so the same branches run.
6. **Pipeline p2p on gloo.** `batch_p2p_comm=True` (batched isend/irecv) gives silently wrong
   activations on gloo with interleaved pipelining; `adapt_model_config` turns it off.
7. **Gradient clipping's scale.** Without TE or Apex, Megatron scales clipped gradients with
   `dst.copy_(src * scale)` per tensor: a temporary the size of every gradient, seconds per
   step for a few hundred million parameters on a small CPU. Scaling in place gives the same
   products without them (`_scale_in_place`).

Two more CPU obstacles are not patches but layers of the local spec, because they are real
features the local backend lacks on any device (see `megatron_internvl.models.local_layers`):
a norm that supports sequence parallelism (torch LayerNorm is refused under SP) and a core
attention that supports context parallelism and packed sequences. And `parallel.collectives`
holds an all-gather with a correct backward, since torch's autograd all_gather returns wrong
gradients on gloo for non-contiguous incoming gradients.

The device mode is thread-local (torch function modes are): code that creates CUDA tensors from
another thread is not redirected.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["adapt_model_config", "install", "is_active", "uninstall"]

_CPU = torch.device("cpu")
# Floating tensor types Megatron-Core compares `param.type()` against.
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU and reports CPU float tensors as CUDA types."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)  # pinning needs a CUDA context
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(out, out)
        return out


class _NoOpStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, *args: Any) -> _NoOpStream:
        return _NoOpStream()

    def record(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _DropSharedGeneratorWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


_RNG_LOGGER = logging.getLogger("megatron.core.tensor_parallel.random")
_RNG_FILTER = _DropSharedGeneratorWarning()


def _get_cpu_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    if kwargs.get("clone") or kwargs.get("graph_safe"):
        raise RuntimeError("CUDA-graph-safe RNG states do not exist on CPU; disable cuda graphs")
    return torch.default_generator.get_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.default_generator.set_state(new_state)


def _seed_cpu_generator(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


_originals: list[tuple[Any, str, Any]] = []
_mode: _CudaToCpuMode | None = None


def _patch(owner: Any, name: str, value: Any) -> None:
    _originals.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def _scale_in_place(
    chunk_size: int, noop_flag: Any, tensor_lists: list[list[torch.Tensor]], scale: float
) -> None:
    """Megatron's fallback `multi_tensor_scale` where it scales tensors in place (gradient
    clipping: sources are the targets): `mul_` per tensor, bitwise the same products."""
    from megatron.core.utils import local_multi_tensor_scale

    sources, targets = tensor_lists
    aliased = len(sources) == len(targets) and all(map(operator.is_, sources, targets))
    if not aliased:
        local_multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale)
        return
    for grad in targets:
        grad.mul_(scale)


def _megatron_patches() -> list[tuple[Any, str, Callable[..., Any]]]:
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.utils import local_multi_tensor_scale

    patches = [
        (mcore_random, "_get_cuda_rng_state", _get_cpu_rng_state),
        (mcore_random, "_set_cuda_rng_state", _set_cpu_rng_state),
    ]
    if clip_grads.multi_tensor_scale_impl is local_multi_tensor_scale:  # no TE or Apex
        patches.append((clip_grads, "multi_tensor_scale_impl", _scale_in_place))
    return patches


def is_active() -> bool:
    """True when `install()` has patched this process."""
    return _mode is not None


def install() -> bool:
    """Make Megatron-Core runnable on CPU ranks. Inert (returns False) when CUDA is available.

    Idempotent; `uninstall()` restores every patched attribute.
    """
    global _mode
    if torch.cuda.is_available():
        return False
    if _mode is not None:
        return True
    cuda = torch.cuda
    torch_patches: list[tuple[Any, str, Any]] = [
        (cuda, "current_device", lambda: _CPU),
        (cuda, "get_rng_state", _get_cpu_rng_state),
        (cuda, "set_rng_state", _set_cpu_rng_state),
        (cuda, "manual_seed", _seed_cpu_generator),
        (cuda, "synchronize", lambda *a, **k: None),
        (cuda, "empty_cache", lambda: None),
        (cuda, "Stream", _NoOpStream),
        (cuda, "Event", _NoOpStream),
        (cuda, "stream", lambda *a, **k: contextlib.nullcontext()),
        (cuda, "current_stream", lambda *a, **k: _NoOpStream()),
        (cuda, "default_stream", lambda *a, **k: _NoOpStream()),
    ]
    for owner, name, value in torch_patches + _megatron_patches():
        _patch(owner, name, value)
    _RNG_LOGGER.addFilter(_RNG_FILTER)
    _mode = _CudaToCpuMode()
    _mode.__enter__()
    return True


def uninstall() -> None:
    """Undo `install()` (used by tests that prove each piece is needed)."""
    global _mode
    if _mode is None:
        return
    _mode.__exit__(None, None, None)
    _mode = None
    _RNG_LOGGER.removeFilter(_RNG_FILTER)
    while _originals:
        owner, name, value = _originals.pop()
        setattr(owner, name, value)


def adapt_model_config(config: Any) -> Any:
    """Adjust a Megatron `TransformerConfig`/`ModelParallelConfig` for CPU ranks, in place.

    Only `batch_p2p_comm` changes: batched p2p is wrong on gloo with interleaved pipelining.
    """
    if is_active():
        config.batch_p2p_comm = False
    return config
