"""Writing and reading the converter's Megatron dist checkpoints one tensor at a time.

The converter's TP=1 model is built on the meta device: its `sharded_state_dict()` gives every
key, shape and offset training's loader expects, and holds no data.

Saving goes through Megatron's own `dist_checkpointing.save` (common state, sharding checks,
`metadata.json`), with a sharded strategy that plans torch DCP's `torch_dist` format from those
meta tensors and materialises each tensor only when the writer reaches it: the planner's
`resolve_data` asks `materialise(parameter name)` for the full parameter and hands the writer
the slice the item covers (a layer of a stacked key, half of a SwiGLU fc1). torch's own
FileSystemWriter keeps every tensor of a file until the file is closed, so this writer writes
and drops them one by one. Loading reads any subset of parameters through torch DCP, the
way Megatron's loader does.

Two private helpers are used so the files are exactly what those libraries write: Megatron's
state-dict translation and torch's per-item writer (megatron-core 0.16, torch 2.13; the
conversion tests load the result at TP=1, TP=2 and PP=2).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedTensor,
    ShardedTensorFactory,
    apply_factories,
    apply_factory_merges,
)
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
    CachedMetadataFileSystemReader,
)
from megatron.core.dist_checkpointing.strategies.checkpointable import (
    CheckpointableShardedTensor,
    LocalShardsContainer,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _write_item
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.futures import Future

from megatron_internvl.checkpoint.errors import ConversionError
from megatron_internvl.checkpoint.safe_pickle import restricted_unpickling, unsafe_cause

Materialise = Callable[[str], torch.Tensor]
"""State-dict name of a parameter -> its full TP=1 value (dtype and shape of the parameter)."""
Advance = Callable[[int], None]
"""Told the bytes of each tensor as it is written."""


def _glibc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc
        return None


_MALLOC_TRIM = _glibc_trim()


def release_memory() -> None:
    """Give freed heap memory back to the OS. Tensors of a few MB come from glibc's heap, and
    freeing them in a different order than they were made leaves holes the next parameter does
    not fit, so without this the RSS creeps up by about a parameter per layer."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@contextlib.contextmanager
def safe_reading() -> Iterator[None]:
    """Reading a dist checkpoint with no unpickling of anything but checkpoint data
    (safe_pickle.py); a file that asks for more is a ConversionError naming it."""
    try:
        with restricted_unpickling():
            yield
    except (Exception, CheckpointException) as error:
        unsafe = unsafe_cause(error)
        if unsafe is None:
            raise
        raise ConversionError(str(unsafe)) from None


@contextlib.contextmanager
def _original_errors() -> Iterator[None]:
    """torch DCP wraps an error in a CheckpointException; re-raise the one underneath (e.g. the
    ConversionError naming a bad HF file), which is what callers and the CLI handle."""
    try:
        yield
    except CheckpointException as wrapped:
        failures = list(wrapped.failures.values())
        if len(failures) != 1:
            raise
        raise failures[0][0] from None


def _storage_id(tensor: torch.Tensor) -> int:
    # Views share their parameter's StorageImpl, also on the meta device (where data_ptr is 0).
    return tensor.untyped_storage()._cdata


class _OnDemandPlanner(MCoreSavePlanner):
    """Megatron's save planner whose tensors are made when the writer asks for them."""

    def __init__(
        self, params: dict[str, torch.Tensor], materialise: Materialise, advance: Advance
    ) -> None:
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self._params = {_storage_id(p): (name, p) for name, p in params.items()}
        self._materialise = materialise
        self._advance = advance
        self._last: tuple[str, torch.Tensor] | None = None  # fc1's halves are written in a row

    def resolve_data(self, write_item: WriteItem) -> Any:
        placeholder = super().resolve_data(write_item)
        if write_item.type == WriteItemType.BYTE_IO:
            return placeholder
        name, param = self._params[_storage_id(placeholder)]
        if self._last is None or self._last[0] != name:
            self._last = None  # drop the previous parameter before making the next
            release_memory()
            value = self._materialise(name)
            if value.shape != param.shape or value.dtype != param.dtype:
                raise AssertionError(
                    f"{name}: made {value.dtype}{list(value.shape)}, the model has "
                    f"{param.dtype}{list(param.shape)}"
                )
            self._last = (name, value.contiguous())
        full = self._last[1]
        offset = placeholder.storage_offset() - param.storage_offset()
        piece = full.as_strided(placeholder.shape, placeholder.stride(), offset)
        self._advance(piece.numel() * piece.element_size())
        return piece


class _ItemByItemWriter(FileSystemWriter):
    """torch's FileSystemWriter, one file per rank, keeping no tensor after writing it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, single_file_per_rank=True, thread_count=1)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        name = f"{plan.storage_data.prefix}0.distcp"  # what torch's writer calls its first file
        results = []
        with open(Path(self.path) / name, "wb") as stream:
            for item in plan.items:
                data = planner.resolve_data(item)
                if isinstance(data, torch.Tensor):
                    data = data.detach()
                    if data.untyped_storage().nbytes() != data.nbytes:
                        data = data.clone()  # torch.save writes a view's whole storage
                results.append(
                    _write_item(
                        self.transforms, stream, data, item, name, self.serialization_format
                    )
                )
                del data
            stream.flush()
            os.fsync(stream.fileno())
        done: Future = Future()
        done.set_result(results)
        return done


class _OnDemandStrategy(TorchDistSaveShardedStrategy):
    """Megatron's `torch_dist` format (same backend name and version), written by the above."""

    def __init__(
        self, params: dict[str, torch.Tensor], materialise: Materialise, advance: Advance
    ) -> None:
        super().__init__("torch_dist", 1)
        self._planner = _OnDemandPlanner(params, materialise, advance)

    def save(self, sharded_state_dict: dict, checkpoint_dir: Path | str) -> None:
        # The translation Megatron's own strategy does before handing the dict to torch DCP.
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, keep_only_main_replica=True
        )
        state = mcore_to_pyt_state_dict(by_key, is_loading=False)
        writer = _ItemByItemWriter(Path(checkpoint_dir))
        with _original_errors():
            dcp.save(state, storage_writer=writer, planner=self._planner)

    def async_save(self, sharded_state_dict: dict, checkpoint_dir: Path | str):
        raise NotImplementedError("the converter saves synchronously")


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state-dict tensors by name (meta tensors for a meta model)."""
    return {
        k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)
    }


def save(model: torch.nn.Module, out: Path, materialise: Materialise, advance: Advance) -> None:
    """Save a (meta) model as a dist checkpoint whose tensors come from `materialise`."""
    strategy = _OnDemandStrategy(model_tensors(model), materialise, advance)
    dist_checkpointing.save(model.sharded_state_dict(), str(out), sharded_strategy=strategy)


def _with_buffer(item: ShardedTensor | ShardedTensorFactory) -> Any:
    """The same sharded item with an empty CPU tensor to load into instead of a meta one."""
    return dataclasses.replace(item, data=torch.empty(item.data.shape, dtype=item.data.dtype))


def _checkpointable(shard: ShardedTensor) -> CheckpointableShardedTensor:
    """A shard as a DCP chunk with the stacked-layer axes made real dimensions.

    Megatron's loader hands stacked-layer keys to DCP as torch ShardedTensors whose metadata
    must cover every chunk of the key on some rank; in a one-process world a single layer
    cannot be asked for that way. A chunk of shape (1, ...) at the layer's offset can.
    """
    if shard.prepend_axis_num:
        local = (1,) * shard.prepend_axis_num + tuple(shard.local_shape)
        shard = dataclasses.replace(
            shard, data=shard.data.view(local), local_shape=local, prepend_axis_num=0
        )
    return CheckpointableShardedTensor.from_sh_ten(shard)


class Reader:
    """Parameters of one dist checkpoint, a few at a time, as full TP=1 tensors.

    `sharded`: the meta model's `sharded_state_dict()`. The checkpoint's metadata is read once
    and the loads skip DCP's collectives (the converter is one process): with one load per
    parameter, both would otherwise cost more than reading the data.
    """

    def __init__(self, sharded: dict[str, Any], ckpt_dir: Path) -> None:
        self._sharded = sharded
        self._storage = CachedMetadataFileSystemReader(ckpt_dir)

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The parameters `names` (state-dict names)."""
        wanted = {name: _with_buffer(self._sharded[name]) for name in names}
        factories = {k: v for k, v in wanted.items() if isinstance(v, ShardedTensorFactory)}
        apply_factories(wanted)  # SwiGLU fc1 -> its gate and up halves, views of the buffer
        by_key: dict[str, list[CheckpointableShardedTensor]] = {}
        for shard in nested_values(wanted):
            by_key.setdefault(shard.key, []).append(_checkpointable(shard))
        state = {
            key: shards[0] if len(shards) == 1 else LocalShardsContainer(shards)
            for key, shards in by_key.items()
        }
        planner = MCoreLoadPlanner(shapes_validation_sharded_tensors=list(nested_values(wanted)))
        with safe_reading(), _original_errors(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")  # as meant
            dcp.load(state, storage_reader=self._storage, planner=planner, no_dist=True)
        dict_list_map_inplace(lambda shard: shard.data, wanted)
        return apply_factory_merges(wanted, factories)
