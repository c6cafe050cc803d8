"""The shard format, and building, reading and validating shards.

Format (WebDataset tars, one sample = consecutive members sharing a key):

- `<key>.json`: UTF-8 JSON object with `conversations` (LLaVA style: [{"from": "human"|"gpt"|
  "system", "value": str}, ...]), `images` (the member extensions of this sample's images, in
  the order of their `<image>` placeholders, e.g. ["0.jpg", "1.png"]; [] for a text-only
  sample), `id` (the source record's id) and any other field of the source record, unchanged.
- `<key>.<i>.<fmt>`: image i (0-based) as encoded bytes, fmt in jpg/png/webp; copied from the
  source file, never re-encoded. No image member at all for a text-only sample.
- keys are `<shard stem>_<n>` (no dots: WebDataset splits the extension at the first dot of the
  file name); the shard builder writes `<prefix>-<NNNNNN>.tar` and a DALI index `<same>.idx` next
  to each tar (`wds2idx` format v1.2: one line per sample of `ext offset size name` quadruples,
  offsets of member data), so readers can seek. DALI's own `fn.readers.webdataset` reads these
  shards with `ext=["json", "0.jpg", ...]` (the whole text after the key's dot is the extension).
- the conversation holds exactly one `<image>` per image in its human turns: the builder inserts
  them InternVL's way when a record has none (`chat.add_image_placeholders`), and the validator
  rejects any other count.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from megatron_internvl.data.chat import IMAGE_PLACEHOLDER, add_image_placeholders

log = logging.getLogger(__name__)

IMAGE_FORMATS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
"""Source file suffix -> stored format."""


class BadSampleError(ValueError):
    """One sample cannot be used; `reason` is a short tag for counters, the message says why."""

    def __init__(self, key: str, reason: str, detail: str) -> None:
        super().__init__(f"sample {key}: {reason}: {detail}")
        self.key = key
        self.reason = reason


# --- reading records ------------------------------------------------------------------------
def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """LLaVA-style records from a `.json` (a list) or `.jsonl` (one object per line) file."""
    path = Path(path)
    with open(path, encoding="utf-8") as handle:
        if path.suffix == ".jsonl":
            records = []
            for line_no, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{line_no}: not valid JSON ({error})") from error
            return records
        records = json.load(handle)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, found {type(records).__name__}")
    return records


def record_images(record: dict[str, Any]) -> list[str]:
    """The image paths of a record: `image` may be absent, a string or a list of strings."""
    image = record.get("image", record.get("images"))
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


# --- writing --------------------------------------------------------------------------------
def write_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
    """Write the DALI index of one shard (same as `dali_pipeline.write_index`, no DALI import)."""
    from wds2idx import IndexCreator  # ships with nvidia-dali

    with IndexCreator(str(tar_path), str(idx_path), verbose=False) as creator:
        creator.create_index()


class ShardWriter:
    """Writes samples into `<prefix>-NNNNNN.tar` shards, starting a new one at a size limit.

    A shard closes when it holds `max_samples` samples or when the next sample would take it
    past `max_bytes` (a single larger sample still gets a shard of its own). Each closed shard
    gets its DALI index.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        max_samples: int | None = 1000,
        max_bytes: int | None = None,
    ) -> None:
        if max_samples is None and max_bytes is None:
            raise ValueError("shards: give max_samples or max_bytes (or both)")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.paths: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._bytes = 0

    def write(self, members: dict[str, bytes]) -> str:
        """Add one sample (extension -> bytes, `json` included); returns its key."""
        size = sum(512 + -(-len(data) // 512) * 512 for data in members.values())
        if self._tar is not None and (
            (self.max_samples is not None and self._count >= self.max_samples)
            or (self.max_bytes is not None and self._bytes + size > self.max_bytes)
        ):
            self._close_shard()
        if self._tar is None:
            path = self.out_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
            self.paths.append(path)
            # USTAR, no timestamps or owners: the same input gives byte-identical shards.
            self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
            self._count = self._bytes = 0
        key = f"{self.paths[-1].stem}_{self._count:06d}".replace(".", "_")
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size
        return key

    def _close_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        write_index(self.paths[-1], self.paths[-1].with_suffix(".idx"))

    def close(self) -> list[Path]:
        """Finish the last shard; returns every shard written."""
        if self._tar is not None:
            self._close_shard()
        return self.paths

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class BuildSummary:
    """What `build_shards` did."""

    shards: list[Path] = field(default_factory=list)
    written: int = 0
    images: int = 0
    text_only: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)
    """One line per skipped record: which record and why."""

    def format(self) -> str:
        """A few lines for the console."""
        lines = [
            f"wrote {self.written} samples ({self.images} images, {self.text_only} text-only, "
            f"{self.bytes / 1e6:.1f} MB) into {len(self.shards)} shard(s)",
        ]
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
            lines.append(f"skipped {sum(self.skipped.values())} record(s): {reasons}")
            lines += [f"  {line}" for line in self.bad[:20]]
            if len(self.bad) > 20:
                lines.append(f"  ... and {len(self.bad) - 20} more")
        return "\n".join(lines)


def _progress(
    iterable: Iterable, total: int, desc: str, enabled: bool, unit: str = "sample"
) -> Iterable:
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # a bar is a nicety, not a requirement
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr)


def record_to_members(
    record: dict[str, Any], image_root: str | os.PathLike, key: str = "?"
) -> dict[str, bytes]:
    """The shard members of one LLaVA record (json first, then images), or `BadSampleError`."""
    conversation = record.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        raise BadSampleError(key, "malformed record", "no 'conversations' list")
    images = record_images(record)
    members: dict[str, bytes] = {}
    stored = []
    for i, rel in enumerate(images):
        path = Path(image_root) / rel
        fmt = IMAGE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise BadSampleError(key, "unsupported image", f"{path}: use .jpg, .png or .webp")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise BadSampleError(key, "missing image", f"{path} ({error.strerror})") from error
        check_image(data, key, f"image {i} ({path})")
        members[f"{i}.{fmt}"] = data
        stored.append(f"{i}.{fmt}")
    try:
        conversation = add_image_placeholders(conversation, len(images), key)
    except (ValueError, KeyError, TypeError) as error:
        raise BadSampleError(key, "placeholder mismatch", str(error)) from error
    meta = {k: v for k, v in record.items() if k not in ("image", "images", "conversations")}
    meta.update(images=stored, conversations=conversation)
    return {"json": json.dumps(meta, ensure_ascii=False).encode(), **members}


def build_shards(
    records: Sequence[dict[str, Any]],
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    max_samples: int | None = 1000,
    max_bytes: int | None = None,
    progress: bool = True,
) -> BuildSummary:
    """Write `records` (LLaVA style) with their images from `image_root` as shards in `out_dir`.

    Records that cannot become a valid sample (missing or undecodable image, wrong number of
    `<image>` placeholders, no conversation) are skipped and listed in the summary.
    """
    summary = BuildSummary()
    with ShardWriter(out_dir, prefix, max_samples, max_bytes) as writer:
        for n, record in enumerate(_progress(records, len(records), "shards", progress)):
            where = f"record {n} (id {record.get('id', '?')})"
            try:
                members = record_to_members(record, image_root, where)
            except BadSampleError as error:
                summary.skipped[error.reason] += 1
                summary.bad.append(str(error))
                continue
            writer.write(members)
            summary.written += 1
            summary.images += len(members) - 1
            summary.text_only += len(members) == 1
            summary.bytes += sum(len(d) for d in members.values())
    summary.shards = writer.paths
    return summary


# --- reading shards -------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleEntry:
    """Where one sample lives: its shard and (offset, size) of each member's data."""

    shard: str
    key: str
    members: dict[str, tuple[int, int]]

    @property
    def name(self) -> str:
        """`<shard path>:<key>`, as logs and errors name samples."""
        return f"{self.shard}:{self.key}"


@dataclass
class RawSample:
    """One sample as stored: its metadata and encoded images, in placeholder order."""

    name: str
    meta: dict[str, Any]
    images: list[bytes]


def index_path(tar_path: str | os.PathLike) -> Path:
    """The DALI index file next to a shard."""
    return Path(tar_path).with_suffix(".idx")


def read_index(tar_path: str | os.PathLike) -> list[SampleEntry]:
    """The samples of one shard from its index file, in stored order."""
    idx = index_path(tar_path)
    if not idx.exists():
        raise FileNotFoundError(
            f"{idx}: no index next to shard {tar_path}; write one with "
            "`python tools/validate_shards.py --fix-index` or shards.write_index"
        )
    entries = []
    with open(idx) as handle:
        header = handle.readline().split()
        if len(header) != 2 or not header[0].startswith("v1."):
            raise ValueError(f"{idx}: not a DALI webdataset index (first line {header})")
        for line in handle:
            fields = line.split()
            if not fields:
                continue
            # Components are (ext, offset, size, member name) quadruples.
            quads = list(zip(*[iter(fields)] * 4, strict=True))
            members = {ext: (int(offset), int(size)) for ext, offset, size, _ in quads}
            name = quads[0][3]
            key = name[: name.find(".", name.rfind("/") + 1)]
            entries.append(SampleEntry(str(tar_path), key, members))
    return entries


class ShardReader:
    """Reads samples by `SampleEntry`, keeping shard files open (seek + read, no tar parsing)."""

    def __init__(self) -> None:
        self._files: dict[str, Any] = {}

    def read_member(self, entry: SampleEntry, ext: str) -> bytes:
        """The bytes of one member; `BadSampleError` when missing or cut short."""
        if ext not in entry.members:
            reason = "missing member" if ext == "json" else "missing image"
            raise BadSampleError(entry.name, reason, f"no .{ext} member in the shard")
        handle = self._files.get(entry.shard)
        if handle is None:
            handle = self._files[entry.shard] = open(entry.shard, "rb")
        offset, size = entry.members[ext]
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

    def read(self, entry: SampleEntry) -> RawSample:
        """Metadata and image bytes of a sample; `BadSampleError` on any structural problem."""
        meta = parse_meta(self.read_member(entry, "json"), entry.name)
        images = [self.read_member(entry, ext) for ext in meta["images"]]
        return RawSample(entry.name, meta, images)

    def close(self) -> None:
        """Close the open shard files."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def parse_meta(data: bytes, name: str) -> dict[str, Any]:
    """Decode and check a sample's `.json` member (conversation present, image list, counts)."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadSampleError(name, "malformed json", str(error)) from error
    if not isinstance(meta, dict):
        raise BadSampleError(
            name, "malformed json", f"expected an object, found {type(meta).__name__}"
        )
    images = meta.get("images", [])
    conversation = meta.get("conversations")
    if not isinstance(images, list) or not all(isinstance(e, str) for e in images):
        raise BadSampleError(name, "malformed json", "'images' must be a list of member extensions")
    if not isinstance(conversation, list) or not all(
        isinstance(t, dict) and isinstance(t.get("value"), str) for t in conversation
    ):
        raise BadSampleError(name, "malformed json", "'conversations' must be a list of turns")
    placeholders = sum(
        t["value"].count(IMAGE_PLACEHOLDER) for t in conversation if t.get("from") == "human"
    )
    if placeholders != len(images):
        raise BadSampleError(
            name,
            "placeholder mismatch",
            f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in human turns but "
            f"{len(images)} image(s); rebuild the sample with one placeholder per image",
        )
    meta["images"] = images
    return meta


def check_image(data: bytes, name: str, what: str = "image") -> tuple[int, int]:
    """Fully decode an image with PIL; its (width, height), or `BadSampleError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # a truncated JPEG raises here (LOAD_TRUNCATED_IMAGES is off)
                return image.size
    except Exception as error:  # PIL raises many types for bad data
        raise BadSampleError(name, "corrupt image", f"{what}: {error}") from error


# --- validating -----------------------------------------------------------------------------
@dataclass
class ValidationReport:
    """Per-sample verdicts of `validate_shards`."""

    good: int = 0
    bad: dict[str, str] = field(default_factory=dict)
    """`<shard>:<key>` -> reason and detail."""
    reasons: Counter = field(default_factory=Counter)
    index_problems: dict[str, str] = field(default_factory=dict)
    """Shard path -> what is wrong with its index (missing, or not matching the tar)."""
    written_indexes: list[Path] = field(default_factory=list)
    clean_shards: list[Path] = field(default_factory=list)

    def format(self) -> str:
        """A few lines for the console."""
        lines = [f"{self.good} good sample(s), {len(self.bad)} bad"]
        lines += [f"  {name}: {why}" for name, why in self.bad.items()]
        lines += [f"  {path}: index {why}" for path, why in self.index_problems.items()]
        if self.written_indexes:
            lines.append(f"wrote {len(self.written_indexes)} index file(s)")
        if self.clean_shards:
            lines.append(f"wrote {len(self.clean_shards)} clean shard(s)")
        return "\n".join(lines)


def iter_tar_samples(tar_path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a tar in stored order, without the index.

    A truncated or damaged tar yields the samples before the damage and then a
    `(key, {"__error__": message})` entry for the sample it was in.
    """
    key, members = None, {}
    try:
        with tarfile.open(tar_path, "r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = info.name[info.name.rfind("/") + 1 :]
                dot = base.find(".")
                this_key = info.name[: len(info.name) - len(base) + dot] if dot > 0 else info.name
                ext = base[dot + 1 :] if dot > 0 else ""
                if this_key != key and key is not None:
                    yield key, members
                    members = {}
                key = this_key
                handle = tar.extractfile(info)
                data = handle.read() if handle is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} cut short")
                members[ext] = data
    except (tarfile.TarError, OSError, EOFError) as error:
        yield (key or "<start>"), {"__error__": f"{type(error).__name__}: {error}".encode()}
        return
    if key is not None:
        yield key, members


def check_members(name: str, members: dict[str, bytes]) -> dict[str, Any]:
    """Full check of one sample's members (json, images decodable, counts); its meta."""
    if "__error__" in members:
        raise BadSampleError(name, "truncated tar", members["__error__"].decode())
    if "json" not in members:
        raise BadSampleError(name, "missing member", "no .json member")
    meta = parse_meta(members["json"], name)
    for i, ext in enumerate(meta["images"]):
        if ext not in members:
            raise BadSampleError(name, "missing image", f"image {i} (.{ext}) is not in the shard")
        check_image(members[ext], name, f"image {i} (.{ext})")
    return meta


def validate_shards(
    paths: Sequence[str | os.PathLike],
    clean_dir: str | os.PathLike | None = None,
    progress: bool = False,
    on_bad: Callable[[str, str], None] | None = None,
    fix_index: bool = False,
) -> ValidationReport:
    """Check every sample of `paths`; with `clean_dir`, also write the good ones there.

    Clean shards keep the input shard names (and get fresh indexes); their keys are renumbered.
    Each shard's index must list the tar's samples in order; `fix_index` rewrites a missing or
    stale one (for a tar that reads to its end).
    """
    report = ValidationReport()
    for path in _progress(paths, len(paths), "validate", progress, unit="shard"):
        writer = None
        if clean_dir is not None:
            writer = ShardWriter(clean_dir, Path(path).stem, max_samples=None, max_bytes=1 << 62)
        keys, damaged = [], False
        for key, members in iter_tar_samples(path):
            keys.append(key)
            damaged |= "__error__" in members
            name = f"{path}:{key}"
            try:
                check_members(name, members)
            except BadSampleError as error:
                report.bad[name] = f"{error.reason}: {str(error).split(': ', 2)[-1]}"
                report.reasons[error.reason] += 1
                if on_bad is not None:
                    on_bad(name, report.bad[name])
                continue
            report.good += 1
            if writer is not None:
                writer.write(_ordered(members))
        _check_index(path, keys, damaged, fix_index, report)
        if writer is not None:
            # ShardWriter names its first shard <prefix>-000000.tar; keep the input's name.
            written = writer.close()
            if written:
                target = Path(clean_dir) / Path(path).name
                written[0].rename(target)
                written[0].with_suffix(".idx").unlink()
                write_index(target, index_path(target))
                report.clean_shards.append(target)
    return report


def _check_index(
    path: str | os.PathLike, keys: list[str], damaged: bool, fix: bool, report: ValidationReport
) -> None:
    try:
        indexed = [entry.key for entry in read_index(path)]
        problem = None if indexed == keys else f"lists {len(indexed)} samples, the tar {len(keys)}"
    except (OSError, ValueError) as error:
        problem = f"unreadable ({error})" if index_path(path).exists() else "missing"
    if problem is None:
        return
    if fix and not damaged:
        write_index(path, index_path(path))
        report.written_indexes.append(index_path(path))
    else:
        report.index_problems[str(path)] = problem


def _ordered(members: dict[str, bytes]) -> dict[str, bytes]:
    return {"json": members["json"], **{k: v for k, v in members.items() if k != "json"}}
