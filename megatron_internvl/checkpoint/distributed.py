"""Training checkpoints: Megatron dist checkpoints with a verified commit marker, and keep-last-K.

A checkpoint directory `step_00001234/` holds the model and optimizer as a Megatron distributed
checkpoint (reshardable to any TP/PP at load), one `rank_NNNNN.pt` per rank (RNG states and the
data loader's position: per-rank by nature; tensors and plain values only, read back with
torch's weights-only unpickler), `meta.json` (step, scheduler, anything common) and, written
last by rank 0 after every rank has finished, the marker `COMMITTED` with a checksum of every
file (integrity.py). A directory without the marker is an interrupted save: it is never loaded
and is removed by the next save of that step.

Resume (`resume`) takes the newest committed checkpoint that passes verification and loads; one
that fails is reported and the previous one is tried. The step is the directory's; a `meta.json`
that disagrees makes the checkpoint unusable. Nothing is deleted because of what a file in a
checkpoint says: keep-last only removes committed checkpoints older than the one just written,
and a committed checkpoint in the way of a new save of the same step is moved aside.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import CheckpointException  # a BaseException, not an Exception

from megatron_internvl.checkpoint import integrity
from megatron_internvl.checkpoint.integrity import COMMIT_MARKER
from megatron_internvl.checkpoint.progress import amount
from megatron_internvl.checkpoint.safe_pickle import (
    UnsafeCheckpointError,
    restricted_unpickling,
    unsafe_cause,
    weights_only_load,
)

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
        _clear_the_way(path)
        path.mkdir(parents=True)
    dist.barrier()
    model_state = _model_state(chunks)
    state = {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, metadata=_OPTIMIZER_FORMAT),
    }
    rank_file = path / f"rank_{rank:05d}.pt"  # written after Megatron checks the dir is empty
    buffer = io.BytesIO()
    torch.save(per_rank, buffer)

    def commit() -> None:  # runs when every rank has finished writing
        if rank == 0:
            _commit(path, step, common, extra_files or {})
            if keep_last:
                prune(root, step, keep_last)

    if async_saver is not None:
        with integrity.hashing_writes():  # the writer process is forked when scheduled
            request = dist_checkpointing.save(state, str(path), async_sharded_save=True)
            integrity.write_hashed(rank_file, buffer.getvalue())
            request.add_finalize_fn(commit)
            async_saver.queue.schedule_async_request(request)
        return path
    with integrity.hashing_writes():
        dist_checkpointing.save(state, str(path))
    integrity.write_hashed(rank_file, buffer.getvalue())
    dist.barrier()  # everything is on disk before the marker says so
    commit()
    dist.barrier()
    return path


def _clear_the_way(path: Path) -> None:
    """Rank 0, before a save of `path`'s step: an interrupted save there is removed; a committed
    checkpoint (e.g. one that failed to load, so training went back to an earlier step) is kept,
    moved aside."""
    if not path.exists():
        return
    if not (path / COMMIT_MARKER).is_file():
        shutil.rmtree(path)
        return
    number = 1
    while path.with_name(f"{path.name}.replaced-{number}").exists():
        number += 1
    aside = path.with_name(f"{path.name}.replaced-{number}")
    path.rename(aside)
    print(f"checkpoint: {path} is being written again; the previous one is kept as {aside}")


def _commit(path: Path, step: int, common: dict[str, Any], extra_files: dict[str, bytes]) -> None:
    for name, data in extra_files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        integrity.write_hashed(path / name, data)
    meta = json.dumps({"step": step, **common}, indent=1).encode()
    integrity.write_hashed(path / "meta.json", meta)
    files, _ = integrity.collect(path)
    integrity.write_marker(path, step, files)


def prune(root: str | os.PathLike, step: int, keep_last: int) -> list[int]:
    """Keep-last-K after writing `step`: remove the committed checkpoints older than `step`
    beyond the K - 1 newest of them. Newer ones are never touched. Returns the steps removed."""
    older = [s for s in committed_steps(root) if s < step]
    doomed = older[: max(len(older) - (keep_last - 1), 0)]
    for old in doomed:
        shutil.rmtree(step_dir(root, old), ignore_errors=True)
    return doomed


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


def size_note(path: Path) -> str:
    """ "1.75 GiB in 14 files": a checkpoint directory's size, in the unit that suits it."""
    files = [item for item in path.rglob("*") if item.is_file()]
    return f"{amount(sum(item.stat().st_size for item in files))} in {len(files)} files"


class CheckpointError(RuntimeError):
    """A checkpoint the run cannot use (none of the committed ones loads, or `pretrained` names
    no checkpoint); the message says which and why."""


def step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"{path}: not a step_NNNNNNNN checkpoint directory")
    return int(match.group(1))


def load(
    path: str | os.PathLike, chunks: list[torch.nn.Module], optimizer: Any | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load model (and optimizer) state in place; return (meta, this rank's per-rank state).

    The step is the directory's; a meta.json that says otherwise is an error. The per-rank
    state is None when the checkpoint was written by a different world size (RNG and loader
    positions then cannot be restored rank by rank).
    """
    path = Path(path)
    if not (path / COMMIT_MARKER).is_file():
        raise FileNotFoundError(
            f"{path} has no {COMMIT_MARKER} marker: it is an interrupted save; load an earlier "
            f"step (committed: {committed_steps(path.parent)})"
        )
    step = step_of(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("step") != step:
        raise ValueError(
            f"{path / 'meta.json'} says step {meta.get('step')!r}, the directory is step {step}"
        )
    model_state = _model_state(chunks)
    state = {"model": model_state}
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=True, metadata=_OPTIMIZER_FORMAT
        )
    with restricted_unpickling():
        loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(chunks):
        getattr(chunk, "module", chunk).load_state_dict(loaded["model"][f"model{i}"])
    if optimizer is not None:
        _copy_only_saved_state(optimizer)
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    rank_file = path / f"rank_{dist.get_rank():05d}.pt"
    saved_world = len(list(path.glob("rank_*.pt")))
    per_rank = None
    if saved_world == dist.get_world_size() and rank_file.is_file():
        per_rank = weights_only_load(rank_file, str(rank_file))
    return meta, per_rank


def verify(path: Path) -> str | None:
    """Collective: check this checkpoint's files against the checksums in its marker, each rank
    a share of the files. Returns the problems found on any rank (None: all match)."""
    files = integrity.recorded_files(path)
    if files is None:
        if dist.get_rank() == 0:
            print(f"checkpoint: {path} records no checksums (an older checkpoint); not verified")
        return None
    names = sorted(files)[dist.get_rank() :: dist.get_world_size()]
    return _agreed(integrity.check_files(path, files, names))


def _agreed(problems: list[str]) -> str | None:
    """Collective: every rank's problems, joined; None when no rank has any."""
    everyone: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problems)
    found = sorted({p for rank_problems in everyone for p in rank_problems or []})
    return "; ".join(found) or None


def resume(
    root: str | os.PathLike,
    chunks: list[torch.nn.Module],
    optimizer: Any | None,
    verify_files: bool = True,
) -> tuple[Path, dict[str, Any], dict[str, Any] | None] | None:
    """Collective: load the newest committed checkpoint under `root` that verifies and loads;
    return (its directory, meta, per-rank state), or None when there is none at all.

    One that fails is reported and the one before it is tried; a file that would run code
    stops the run (UnsafeCheckpointError). `verify_files=False` skips the checksums.
    """
    steps = committed_steps(root)
    rejected = []
    for step in reversed(steps):
        path = step_dir(root, step)
        if dist.get_rank() == 0:  # a large model's checkpoint takes minutes to check and read
            checked = "checking and loading" if verify_files else "loading"
            print(f"checkpoint: {checked} {path} ({size_note(path)})", flush=True)
        problem, result = _try_load(path, chunks, optimizer, verify_files)
        if problem is None:
            return path, *result
        rejected.append(f"{path.name}: {problem}")
        if dist.get_rank() == 0:
            print(
                f"checkpoint: {path} is unusable ({problem}); trying the previous committed one",
                flush=True,
            )
    if rejected:
        raise CheckpointError(
            f"no committed checkpoint in {root} can be loaded:\n  " + "\n  ".join(rejected)
        )
    return None


def _try_load(
    path: Path, chunks: list[torch.nn.Module], optimizer: Any | None, verify_files: bool
) -> tuple[str | None, tuple[dict[str, Any], dict[str, Any] | None] | None]:
    try:
        problem = verify(path) if verify_files else None
    except (OSError, ValueError) as error:  # unreadable marker: the same on every rank
        problem = str(error)
    if problem is not None:
        return problem, None
    unsafe = []
    try:
        result = load(path, chunks, optimizer)
        mine: list[str] = []
    except (Exception, CheckpointException) as error:  # any failure: report, try the previous
        if unsafe_cause(error) is not None:
            unsafe, mine, result = [str(unsafe_cause(error))], [], None
        else:
            mine, result = [f"loading failed: {type(error).__name__}: {error}"], None
    refused = _agreed(unsafe)
    if refused is not None:
        raise UnsafeCheckpointError(refused)
    return _agreed(mine), result


def load_model_only(path: str | os.PathLike, chunks: list[torch.nn.Module]) -> None:
    """Load just the model from a checkpoint (e.g. a converted HF checkpoint), any layout."""
    if not (Path(path) / "metadata.json").is_file():  # what every rank sees: refused on each
        found = "no such directory" if not Path(path).is_dir() else "no Megatron checkpoint in"
        raise CheckpointError(
            f"checkpoint.pretrained: {found} {path} (convert an HF checkpoint with "
            "tools/convert_hf.py to-megatron, or name a step_NNNNNNNN directory of a run)"
        )
    model_state = _model_state(chunks)
    try:
        with restricted_unpickling():
            loaded = dist_checkpointing.load({"model": model_state}, str(path))
    except (Exception, CheckpointException) as error:
        if unsafe_cause(error) is not None:  # say it plainly, not in torch's per-rank wrapper
            raise unsafe_cause(error) from None
        raise
    for i, chunk in enumerate(chunks):
        getattr(chunk, "module", chunk).load_state_dict(loaded["model"][f"model{i}"])
