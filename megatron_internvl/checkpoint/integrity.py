"""Checksums of every checkpoint file, computed while the file is written, kept in the commit
marker and checked before a checkpoint is loaded.

The tensor files (`*.distcp`) are written by Megatron's FileSystemWriterAsync, in forked writer
processes, through the builtin `open`. `hashing_writes()` gives that module an `open` whose
files hash every byte on its way to disk and, when closed, leave `<file>.sha256` next to the
file (a few bytes, read by the commit on rank 0 and then removed). The per-rank state files and
everything rank 0 writes at commit are hashed from the bytes in memory. Only the small files
Megatron/torch write themselves (`.metadata`, `common.pt`, `metadata.json`) are hashed by reading
them back at commit.

The marker `COMMITTED` is JSON: {"step": N, "files": {name: {"bytes": size, "sha256": hex}}}.
Markers of older checkpoints (just the step) carry no checksums; such checkpoints load
unverified, with a note.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

COMMIT_MARKER = "COMMITTED"
SIDECAR = ".sha256"
_CHUNK = 16 * 2**20


class _HashingFile:
    """A binary file opened for writing that hashes what is written to it."""

    def __init__(self, path: str | os.PathLike, mode: str) -> None:
        self._file = open(path, mode)  # closed by close() / __exit__
        self._path = Path(path)
        self._hash = hashlib.sha256()
        self._bytes = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._bytes += view.nbytes
        return self._file.write(view)

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        record = {"bytes": self._bytes, "sha256": self._hash.hexdigest()}
        _write_sidecar(self._path, record)

    def __enter__(self) -> _HashingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno (fsync), seekable ...
        return getattr(self._file, name)


def _write_sidecar(path: Path, record: dict[str, Any]) -> None:
    sidecar = path.with_name(path.name + SIDECAR)
    sidecar.write_text(json.dumps(record))


def _open_hashing(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    if mode == "wb" and not args and not kwargs:
        return _HashingFile(file, mode)
    return open(file, mode, *args, **kwargs)


@contextlib.contextmanager
def hashing_writes() -> Iterator[None]:
    """Within it (and in writer processes forked within it), Megatron's tensor-file writes are
    hashed as they stream to disk."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    had = "open" in vars(filesystem_async)
    previous = vars(filesystem_async).get("open")
    filesystem_async.open = _open_hashing
    try:
        yield
    finally:
        if had:
            filesystem_async.open = previous
        else:
            del filesystem_async.open


def write_hashed(path: Path, data: bytes) -> None:
    """Write `data` to `path` (fsynced) and its checksum beside it, hashed from memory."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    _write_sidecar(path, {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})


def file_digest(path: Path) -> dict[str, Any]:
    """Checksum of a file read from disk."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def collect(path: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Checksums of every file under `path` (sidecars consumed and removed), and the names that
    had to be read back to hash them."""
    files: dict[str, dict[str, Any]] = {}
    read_back = []
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        name = item.relative_to(path).as_posix()
        if name == COMMIT_MARKER or name.endswith(SIDECAR):
            continue
        sidecar = item.with_name(item.name + SIDECAR)
        if sidecar.is_file():
            files[name] = json.loads(sidecar.read_text())
        else:
            files[name] = file_digest(item)
            read_back.append(name)
    for sidecar in path.rglob("*" + SIDECAR):
        sidecar.unlink()
    return files, read_back


def write_marker(path: Path, step: int, files: dict[str, dict[str, Any]]) -> None:
    with open(path / COMMIT_MARKER, "w") as handle:
        handle.write(json.dumps({"step": step, "files": files}, indent=0))
        handle.flush()
        os.fsync(handle.fileno())


def recorded_files(path: Path) -> dict[str, dict[str, Any]] | None:
    """The checksums the marker records; None for a marker written before checksums existed."""
    text = (path / COMMIT_MARKER).read_text()
    try:
        marker = json.loads(text)
    except json.JSONDecodeError:
        marker = None
    if isinstance(marker, dict) and isinstance(marker.get("files"), dict):
        return marker["files"]
    if text.strip().isdigit():
        return None
    raise ValueError(f"{path / COMMIT_MARKER}: unreadable commit marker")


def check_files(path: Path, files: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """Problems with the files `names` (a share of the recorded ones) against the marker."""
    problems = []
    for name in names:
        item = path / name
        expected = files[name]
        if not item.is_file():
            problems.append(f"{name} is missing")
        elif item.stat().st_size != expected["bytes"]:
            problems.append(
                f"{name} has {item.stat().st_size} bytes, the marker records {expected['bytes']}"
            )
        elif file_digest(item)["sha256"] != expected["sha256"]:
            problems.append(f"{name} does not match its recorded checksum (damaged)")
    return problems
