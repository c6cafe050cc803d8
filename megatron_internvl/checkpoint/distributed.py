"""Training checkpoints: Megatron dist checkpoints with a commit marker, and keep-last-K.

A checkpoint directory `step_00001234/` holds the model and optimizer as a Megatron distributed
checkpoint (reshardable to any TP/PP at load), one `rank_NNNNN.pt` per rank (RNG states and the
data loader's position: per-rank by nature), `meta.json` (step, scheduler, anything common) and,
written last by rank 0 after every rank has finished, the marker `COMMITTED`. A directory without
the marker is an interrupted save: it is never loaded and is removed by the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

COMMIT_MARKER = "COMMITTED"
# Optimizer state saved in model space, so a run can resume at another TP/PP/DP layout.
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def committed_steps(root: str | os.PathLike) -> list[int]:
    """Steps with a complete checkpoint under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMMIT_MARKER).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_committed(root: str | os.PathLike) -> Path | None:
    steps = committed_steps(root)
    return step_dir(root, steps[-1]) if steps else None


def _model_state(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    return {f"model{i}": getattr(c, "module", c).sharded_state_dict() for i, c in enumerate(chunks)}


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


class AsyncSaver:
    """Checkpoints written in the background (Megatron's async dist checkpointing).

    A save returns once the tensors are staged; the files are written by a background process
    and the checkpoint is committed (meta.json, marker, pruning) when every rank has finished,
    at a later `poll()` or at `close()`, which the loop calls before it exits.
    """

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue()

    def poll(self, blocking: bool = False) -> None:
        """Collective: commit every save that all ranks have finished writing."""
        self.queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        self.poll(blocking=True)
        self.queue.close()


def save(
    root: str | os.PathLike,
    step: int,
    chunks: list[torch.nn.Module],
    optimizer: Any,
    common: dict[str, Any],
    per_rank: dict[str, Any],
    keep_last: int | None = None,
    extra_files: dict[str, bytes] | None = None,
    async_saver: AsyncSaver | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    `extra_files` (relative path -> bytes) are written by rank 0 before the commit marker.
    With `async_saver` the directory is committed later, when every rank has written it.
    """
    path = step_dir(root, step)
    rank = dist.get_rank()
    if rank == 0:
        if path.exists():  # an earlier, interrupted save of this step
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    model_state = _model_state(chunks)
    state = {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, metadata=_OPTIMIZER_FORMAT),
    }
    rank_file = path / f"rank_{rank:05d}.pt"  # written after Megatron checks the dir is empty

    def commit() -> None:  # runs when every rank has finished writing
        if rank == 0:
            for name, data in (extra_files or {}).items():
                (path / name).parent.mkdir(parents=True, exist_ok=True)
                (path / name).write_bytes(data)
            _fsync_write(path / "meta.json", json.dumps({"step": step, **common}, indent=1))
            _fsync_write(path / COMMIT_MARKER, f"{step}\n")
            if keep_last:
                for old in committed_steps(root)[:-keep_last]:
                    shutil.rmtree(step_dir(root, old), ignore_errors=True)

    if async_saver is not None:
        request = dist_checkpointing.save(state, str(path), async_sharded_save=True)
        torch.save(per_rank, rank_file)
        request.add_finalize_fn(commit)
        async_saver.queue.schedule_async_request(request)
        return path
    dist_checkpointing.save(state, str(path))
    torch.save(per_rank, rank_file)
    dist.barrier()  # everything is on disk before the marker says so
    commit()
    dist.barrier()
    return path


def _materialize_optimizer_state(optimizer: Any) -> None:
    """Create zero Adam state (step 0) where none exists yet, so a checkpoint can overwrite it.

    Without apex/TE, Megatron-Core 0.16 falls back to torch's Adam, whose state appears only at
    the first step, while its distributed optimizer reads `state["step"]` while loading.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is None:
            continue
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                state = torch_optimizer.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)
                    state["step"] = torch.tensor(0.0)


def _copy_only_saved_state(optimizer: Any) -> None:
    """Work around Megatron-Core 0.16 on the torch-Adam fallback (no apex/TE): loading copies
    every key of the live Adam state, including torch's per-parameter `step`, which the saved
    parameter state does not hold (the step comes back through the param groups). Copy only
    the keys the checkpoint has. Does nothing where apex or TE provide the optimizer.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(inner, distrib_optimizer.DistributedOptimizer):
            continue
        if inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            continue

        def copy_saved(model_param: torch.Tensor, tensors: dict, _inner: Any = inner) -> None:
            group_index, group_order = _inner.model_param_group_index_map[model_param]
            main_param = _inner.optimizer.param_groups[group_index]["params"][group_order]
            live = {"param": main_param, **_inner.optimizer.state[main_param]}
            for key, value in tensors.items():
                live[key].copy_(value)

        inner._set_main_param_and_optimizer_states = copy_saved


def _unshare_adam_steps(optimizer: Any) -> None:
    """Second part of the torch-Adam workaround: Megatron-Core 0.16 restores `step` as ONE tensor
    shared by every parameter's state, and torch's Adam increments it in place once per
    parameter, so every later step would use the wrong bias correction. Give each its own copy.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is None:
            continue
        for state in torch_optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def load(
    path: str | os.PathLike, chunks: list[torch.nn.Module], optimizer: Any | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load model (and optimizer) state in place; return (meta, this rank's per-rank state).

    The per-rank state is None when the checkpoint was written by a different world size (RNG
    and loader positions then cannot be restored rank by rank).
    """
    path = Path(path)
    if not (path / COMMIT_MARKER).is_file():
        raise FileNotFoundError(
            f"{path} has no {COMMIT_MARKER} marker: it is an interrupted save; load an earlier "
            f"step (committed: {committed_steps(path.parent)})"
        )
    model_state = _model_state(chunks)
    state = {"model": model_state}
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=True, metadata=_OPTIMIZER_FORMAT
        )
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(chunks):
        getattr(chunk, "module", chunk).load_state_dict(loaded["model"][f"model{i}"])
    if optimizer is not None:
        _copy_only_saved_state(optimizer)
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    meta = json.loads((path / "meta.json").read_text())
    rank_file = path / f"rank_{dist.get_rank():05d}.pt"
    saved_world = len(list(path.glob("rank_*.pt")))
    per_rank = None
    if saved_world == dist.get_world_size() and rank_file.is_file():
        per_rank = torch.load(rank_file, weights_only=False)
    return meta, per_rank


def load_model_only(path: str | os.PathLike, chunks: list[torch.nn.Module]) -> None:
    """Load just the model from a checkpoint (e.g. a converted HF checkpoint), any layout."""
    model_state = _model_state(chunks)
    loaded = dist_checkpointing.load({"model": model_state}, str(path))
    for i, chunk in enumerate(chunks):
        getattr(chunk, "module", chunk).load_state_dict(loaded["model"][f"model{i}"])
