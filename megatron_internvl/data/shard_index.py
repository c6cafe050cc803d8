"""Finding shards and their DALI-format indexes: list, write (atomically), read, build on demand.

An index (`<shard>.idx`, `wds2idx` format v1.2, what DALI's `fn.readers.webdataset` reads) has a
header `v1.2 <samples>` and one line per sample of `ext offset size name` quadruples, offsets of
member data, so a reader can seek instead of parsing the tar. Members whose names hold
whitespace cannot be written in this format; they are left out (the validator names them).

A training run pointed at a folder of plain WebDataset tars builds the missing indexes itself:
one process per shard takes a lock file (`O_EXCL`), writes the index to a temporary name and
renames it into place; the others wait for it (`ensure_index`).
"""

from __future__ import annotations

import os
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from megatron_internvl.data.errors import DataError

INDEX_VERSION = "v1.2"
T = TypeVar("T")
LOCK_WAIT_S = 600.0
"""How long a process waits for another one to finish an index before giving up."""


@dataclass(frozen=True)
class SampleEntry:
    """Where one sample lives: its shard and (offset, size) of each member's data.

    `problem` is set for an index line that cannot be used (it becomes a bad sample).
    """

    shard: str
    key: str
    members: dict[str, tuple[int, int]]
    problem: str | None = None

    @property
    def name(self) -> str:
        """`<shard path>:<key>`, as logs and errors name samples."""
        return f"{self.shard}:{self.key}"


def index_path(tar_path: str | os.PathLike) -> Path:
    """The index file next to a shard."""
    return Path(tar_path).with_suffix(".idx")


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a member: WebDataset splits at the first dot of the file name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def shard_list(paths: Sequence[str | os.PathLike]) -> tuple[str, ...]:
    """Expand directories to their `.tar` files (sorted); keep files as given.

    `DataError` for a path that does not exist or a directory without `.tar` files.
    """
    out: list[str] = []
    for path in map(Path, paths):
        if not path.exists():
            raise DataError(f"data: no such directory or file: {path}")
        if path.is_dir():
            tars = sorted(map(str, path.glob("*.tar")))
            if not tars:
                raise DataError(
                    f"data: no .tar shards in {path}; build some with "
                    f"`python tools/build_shards.py --json <records> --image-root <images> "
                    f"--out {path}`"
                )
            out += tars
        else:
            out.append(str(path))
    return tuple(out)


def index_lines(tar_path: str | os.PathLike) -> list[list[tuple[str, int, int, str]]]:
    """Per sample, its (ext, data offset, size, member name) quadruples, from the tar itself.

    `ValueError` for a tar that does not read to its end or holds no sample.
    """
    samples: list[list[tuple[str, int, int, str]]] = []
    last_key = None
    try:
        with tarfile.open(tar_path, "r|") as tar:
            for info in tar:
                if not info.isfile() or any(c.isspace() for c in info.name):
                    continue
                key, ext = split_member(info.name)
                if not key or key.endswith("/"):
                    continue  # hidden files, as wds2idx skips them
                if key != last_key:
                    samples.append([])
                    last_key = key
                samples[-1].append((ext, info.offset_data, info.size, info.name))
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(f"{tar_path}: the tar does not read to its end ({error})") from error
    if not samples:
        raise ValueError(f"{tar_path}: the tar holds no sample")
    size = os.path.getsize(tar_path)
    if any(offset + length > size for s in samples for _, offset, length, _ in s):
        raise ValueError(f"{tar_path}: the tar is cut short")
    return samples


def write_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> Path:
    """Write the index of one shard atomically (temporary file + rename); returns its path.

    `ValueError` (nothing written) when the tar is damaged or empty.
    """
    target = Path(idx_path) if idx_path is not None else index_path(tar_path)
    samples = index_lines(tar_path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(f"{INDEX_VERSION} {len(samples)}\n")
        for sample in samples:
            handle.write(" ".join(f"{e} {o} {s} {n}" for e, o, s, n in sample) + "\n")
    os.replace(tmp, target)
    return target


def _parse_line(tar_path: str, number: int, line: str) -> SampleEntry:
    fields = line.split()
    where = f"index line {number}"
    if len(fields) % 4:
        return SampleEntry(tar_path, where, {}, f"{len(fields)} fields, not quadruples")
    members: dict[str, tuple[int, int]] = {}
    key = split_member(fields[3])[0]
    for ext, offset, length, name in zip(*[iter(fields)] * 4, strict=True):
        try:
            start, count = int(offset), int(length)
        except ValueError:
            return SampleEntry(tar_path, key, {}, f"{where}: offset/size not integers")
        if start < 0 or count < 0:  # past the end is a cut tar: the reader says so
            return SampleEntry(tar_path, key, {}, f"{where}: .{ext} at {start}+{count}")
        if split_member(name)[0] != key:
            return SampleEntry(tar_path, key, {}, f"{where}: members of several samples")
        members[ext] = (start, count)
    return SampleEntry(tar_path, key, members)


def read_index(tar_path: str | os.PathLike) -> list[SampleEntry]:
    """The samples of one shard from its index, in stored order.

    `DataError` when the index is missing or is not an index; a line that cannot be used
    becomes an entry with `problem` set (a bad sample, not a crash).
    """
    idx = index_path(tar_path)
    if not idx.exists():
        raise DataError(
            f"data: no index {idx} next to shard {tar_path}; build it with "
            f"`python tools/validate_shards.py --fix-index {Path(tar_path).parent}`"
        )
    with open(idx, encoding="utf-8", errors="replace") as handle:
        header = handle.readline().split()
        if len(header) != 2 or not header[0].startswith("v1."):
            raise DataError(
                f"data: {idx} is not a DALI webdataset index (first line {header}); rebuild it "
                f"with `python tools/validate_shards.py --fix-index {tar_path}`"
            )
        lines = [(n, line) for n, line in enumerate(handle, 2) if line.strip()]
    return [_parse_line(str(tar_path), n, line) for n, line in lines]


def ensure_index(tar_path: str | os.PathLike, wait_s: float = LOCK_WAIT_S) -> Path:
    """The shard's index, built first when missing (by one process; the others wait)."""
    idx = index_path(tar_path)
    fix = f"build it with `python tools/validate_shards.py --fix-index {Path(tar_path).parent}`"

    def index(path: Path) -> None:
        size = Path(tar_path).stat().st_size / 2**20
        print(f"data: indexing {tar_path} ({size:,.1f} MiB; no .idx beside it yet)", flush=True)
        write_index(tar_path, path)

    try:
        build_once(idx, index, f"the index {idx}", fix, wait_s)
    except ValueError as error:
        raise DataError(
            f"data: cannot index {error}; check it with tools/validate_shards.py"
        ) from error
    return idx


def build_once(
    target: Path,
    write: Callable[[Path], T],
    what: str,
    fix: str = "make the shard folder writable",
    wait_s: float = LOCK_WAIT_S,
    rebuild: bool = False,
) -> T | None:
    """Make `target` with `write(target)` unless it exists (`rebuild`: replace it), by one
    process: it takes a lock file (`O_EXCL`) next to it, the others wait for the lock to go.
    Returns what `write` returned in the process that wrote, None in the others."""
    lock = target.with_name(f".{target.name}.lock")
    deadline = time.monotonic() + wait_s
    while rebuild or not target.exists():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if time.monotonic() > deadline:
                raise DataError(
                    f"data: waited {wait_s:.0f} s for another process to write {what}; if "
                    f"none is running, delete {lock}"
                ) from None
            time.sleep(0.2)
            rebuild = rebuild and lock.exists()  # another process rebuilt it meanwhile
            continue
        except OSError as error:
            raise DataError(
                f"data: cannot write {what}: its folder is not writable ({error.strerror}); {fix}"
            ) from error
        try:
            return write(target)
        finally:
            os.close(fd)
            lock.unlink(missing_ok=True)
    return None
