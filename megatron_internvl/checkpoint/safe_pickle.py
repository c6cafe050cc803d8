"""Reading checkpoint files without letting them run code.

A Megatron dist checkpoint holds three kinds of pickle: torch DCP's `.metadata` (read by
torch with a plain `pickle.load`), the BYTE_IO items inside the `.distcp` files (read by torch's
load planner with `torch.load(weights_only=False)`) and Megatron's `common.pt` (a `torch.load`
whose safety rests on torch's default). Tensor items are already read with `weights_only=True`.

`restricted_unpickling()` routes the first three through unpicklers that only build what a
genuine checkpoint holds: `.metadata` through an allow-list of torch's checkpoint metadata
classes, BYTE_IO items and `common.pt` through torch's own `weights_only` unpickler. A file that
asks for anything else raises `UnsafeCheckpointError` naming the file and the class, before any
of it runs. Loading code wraps Megatron/torch's readers in it (resume, `checkpoint.pretrained`,
the converter).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
from collections.abc import Iterator
from typing import Any

import torch

# What torch DCP's `.metadata` holds (torch 2.13, Megatron-Core 0.16): the Metadata tree, the
# save plans Megatron keeps in it, storage locations, sizes, dtypes and layouts.
_METADATA_CLASSES: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.planner": {
        "SavePlan",
        "WriteItem",
        "WriteItemType",
        "TensorWriteData",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    # StorageMeta.checkpoint_id as a path (the converter's writer): building one runs no code.
    "pathlib": {"PosixPath", "PurePosixPath"},
}


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something other than checkpoint data (possibly code)."""


# Refusals since the last `restricted_unpickling()` began: torch re-raises some errors (a bad
# `.metadata`) as a new AssertionError holding only the message, so the cause is kept here too.
_REFUSED: list[UnsafeCheckpointError] = []


def _refuse(path: str, what: str) -> UnsafeCheckpointError:
    error = UnsafeCheckpointError(
        f"{path}: refused to load: it asks for {what}, which a genuine checkpoint does not hold "
        f"(the file may have been tampered with); nothing from it was run. Use a checkpoint "
        f"from a trusted source."
    )
    _REFUSED.append(error)
    return error


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only the classes of `_METADATA_CLASSES` and torch dtypes."""

    def __init__(self, stream: Any, path: str) -> None:
        super().__init__(stream)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _refuse(self._path, f"{module}.{name}")


def load_metadata_pickle(stream: Any, path: str | os.PathLike) -> Any:
    """Unpickle a DCP `.metadata` stream through the allow-list."""
    try:
        return _MetadataUnpickler(stream, str(path)).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: not a readable checkpoint metadata file ({error})") from error


def weights_only_load(source: Any, where: str, **kwargs: Any) -> Any:
    """torch.load through torch's restricted (`weights_only`) unpickler, naming `where`."""
    try:
        return torch.load(source, weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        raise _refuse(where, f"an object outside torch's weights-only set ({error})") from None


def _not_a_refusal(record: logging.LogRecord) -> bool:
    """torch DCP logs a failed metadata read with its traceback (on the root logger); a refusal
    is reported once, in one line, by whoever catches it."""
    error = record.exc_info[1] if record.exc_info else None
    for _ in range(10):
        if error is None:
            return True
        if isinstance(error, UnsafeCheckpointError):
            return False
        error = error.__cause__ or error.__context__
    return True


@contextlib.contextmanager
def restricted_unpickling() -> Iterator[None]:
    """Within it, Megatron/torch's checkpoint readers unpickle only checkpoint data."""
    from megatron.core.dist_checkpointing.strategies import common
    from torch.distributed.checkpoint import default_planner, filesystem

    reader = filesystem.FileSystemReader
    planner = default_planner.DefaultLoadPlanner
    common_strategy = common.TorchCommonLoadStrategy
    saved = (reader.read_metadata, planner.load_bytes, common_strategy.load_common)
    _REFUSED.clear()

    def read_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata_pickle(stream, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = filesystem.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def load_bytes(self: Any, read_item: Any, value: io.BytesIO) -> None:
        stored = self.metadata.storage_data.get(read_item.storage_index)
        file = stored.relative_path if stored is not None else "a .distcp file"
        where = f"{file} (its item {read_item.dest_index.fqn})"
        obj = weights_only_load(value, where)
        if self.flatten_state_dict:
            default_planner.set_element(
                self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj
            )
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

    def load_common(self: Any, checkpoint_dir: Any) -> Any:
        path = os.path.join(checkpoint_dir, common.COMMON_STATE_FNAME)
        if not os.path.isfile(path):
            return saved[2](self, checkpoint_dir)  # Megatron's own "does not exist" error
        return weights_only_load(path, path, map_location="cpu")

    reader.read_metadata = read_metadata
    planner.load_bytes = load_bytes
    common_strategy.load_common = load_common
    logging.getLogger().addFilter(_not_a_refusal)
    try:
        yield
    finally:
        reader.read_metadata, planner.load_bytes, common_strategy.load_common = saved
        logging.getLogger().removeFilter(_not_a_refusal)


def unsafe_cause(error: BaseException) -> UnsafeCheckpointError | None:
    """The UnsafeCheckpointError behind `error`, also when torch DCP wrapped it (per rank) in a
    CheckpointException, or re-raised it as another error with just its message."""
    if _REFUSED:
        return _REFUSED[0]
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, UnsafeCheckpointError):
            return error
        for failure in getattr(error, "failures", {}).values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException) and unsafe_cause(inner) is not None:
                return unsafe_cause(inner)
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None
