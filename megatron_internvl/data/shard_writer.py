"""Writing shards with webdataset's `ShardWriter`: `<prefix>-NNNNNN.tar`, an index each
(`shard_index.write_index`), keys the running sample number (`%09d`); the prefix is a plain name,
so nothing lands outside `out_dir`."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import webdataset as wds

from megatron_internvl.data.errors import DataError
from megatron_internvl.data.shard_index import write_index

PREFIX = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""A shard prefix is a plain file-name stem (no folders, no `..`)."""


class ShardWriter:
    """webdataset's `ShardWriter` with an index per closed shard and the keys numbered.

    A shard closes after `max_samples` samples or once it holds `max_bytes` (so it exceeds
    the limit by at most its last sample), as webdataset does.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        max_samples: int | None = 1000,
        max_bytes: int | None = None,
    ) -> None:
        if not PREFIX.fullmatch(prefix):
            raise DataError(
                f"shards: prefix {prefix!r} is not a plain name; use letters, digits, '_', '-', '.'"
            )
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []
        self.count = 0
        self._writer = wds.ShardWriter(
            str(self.out_dir / f"{prefix}-%06d.tar"),
            maxcount=max_samples or sys.maxsize,
            maxsize=max_bytes or float("inf"),
            post=self._closed,
            verbose=0,
            mtime=0.0,  # the same input gives byte-identical shards
        )

    def _closed(self, fname: str) -> None:
        write_index(fname)
        self.paths.append(Path(fname))

    def write(self, members: dict[str, bytes]) -> str:
        """Add one sample (extension -> bytes); returns its key."""
        key = f"{self.count:09d}"
        self._writer.write({"__key__": key, **members})
        self.count += 1
        return key

    def close(self) -> list[Path]:
        """Finish the last shard; returns every shard written (an empty last one is removed)."""
        if hasattr(self._writer, "tarstream"):
            last = self._writer.fname
            empty = self._writer.count == 0
            self._writer.post = None if empty else self._closed
            self._writer.close()
            if empty and last is not None:
                Path(last).unlink(missing_ok=True)
        return self.paths

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
