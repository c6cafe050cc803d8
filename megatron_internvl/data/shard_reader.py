"""Reading shards: one member by its index entry (seek + read, bounded), or every sample of a
tar in stored order (the validator's view, no index needed)."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from megatron_internvl.data.errors import BadSampleError
from megatron_internvl.data.shard_index import SampleEntry, split_member

TAR_ERROR = "__error__"
"""Member name `iter_tar_samples` uses for "the tar broke inside this sample"."""
BAD_NAME = "__bad_name__"
"""Member name `iter_tar_samples` uses for "a member name the index format cannot hold"."""


class ShardReader:
    """Reads members by `SampleEntry`, keeping shard files open."""

    def __init__(self) -> None:
        self._files: dict[str, BinaryIO] = {}

    def read_member(
        self,
        entry: SampleEntry,
        ext: str,
        max_bytes: int | None = None,
        limit_name: str = "max_member_bytes",
    ) -> bytes:
        """The bytes of one member; `BadSampleError` when missing, over `max_bytes` (the config
        key `limit_name`) or cut short."""
        if entry.problem is not None:
            raise BadSampleError(entry.name, "bad index entry", entry.problem)
        if ext not in entry.members:
            raise BadSampleError(entry.name, "missing member", f"no .{ext} member in the shard")
        offset, size = entry.members[ext]
        if max_bytes is not None and size > max_bytes:
            raise BadSampleError(
                entry.name, f"over {limit_name}", f".{ext} is {size} bytes > {max_bytes}"
            )
        handle = self._files.get(entry.shard)
        if handle is None:
            handle = self._files[entry.shard] = open(entry.shard, "rb")
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise BadSampleError(
                entry.name,
                "truncated tar",
                f".{ext} needs {size} bytes at offset {offset}, the file has {len(data)}; "
                "the shard was cut short: rebuild it or drop it (tools/validate_shards.py)",
            )
        return data

    def close(self) -> None:
        """Close the open shard files."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def iter_tar_samples(
    tar_path: str | os.PathLike, max_member_bytes: int | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a tar in stored order, without the index.

    A damaged tar yields the samples before the damage and then `(key, {TAR_ERROR: message})`
    for the sample it was in. A member larger than `max_member_bytes` is not read: its value
    is `b""` and the sample gets a `BAD_NAME`-style marker (`__too_big__.<ext>`: size).
    """
    key, members = None, {}
    try:
        with tarfile.open(tar_path, "r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                this_key, ext = split_member(info.name)
                if this_key != key and key is not None:
                    yield key, members
                    members = {}
                key = this_key
                if any(c.isspace() for c in info.name):
                    members[BAD_NAME] = info.name.encode("utf-8", "replace")
                    continue
                if max_member_bytes is not None and info.size > max_member_bytes:
                    members[f"__too_big__.{ext}"] = str(info.size).encode()
                    continue
                handle = tar.extractfile(info)
                data = handle.read() if handle is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} cut short")
                members[ext] = data
    except (tarfile.TarError, OSError, EOFError) as error:
        yield (key or "<start>"), {TAR_ERROR: f"{type(error).__name__}: {error}".encode()}
        return
    if key is not None:
        yield key, members
