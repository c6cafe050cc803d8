"""Converting datasets into shards in the standard layouts `samples.parse_sample` reads.

- LLaVA/InternVL records (`.json` list or `.jsonl`, `image` a path or a list of paths relative
  to an image root): `<key>.<ext>` (one image) or `<key>.<n>.<ext>` (several) + `<key>.json` with
  the record's fields; image bytes are copied, never re-encoded. A record with no `<image>`
  placeholder gets them InternVL's way. A record with `video` (an .mp4/.webm path, InternVL's
  field) gets a `<key>.mp4|webm` member instead. Every path must stay inside the image root.
- img2dataset output in its "files" format (`<dir>/<nnnnn>/<key>.jpg` + `.txt` + `.json`): the
  same three members per sample. Its "webdataset" format is already shards: train on it as is.

Records or samples that cannot be used are skipped and listed in the summary.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_internvl.data.chat import add_image_placeholders
from megatron_internvl.data.errors import BadSampleError, DataError
from megatron_internvl.data.samples import (
    IMAGE_EXTS,
    SampleConfig,
    decode_image,
    image_header_size,
)
from megatron_internvl.data.shard_writer import ShardWriter
from megatron_internvl.data.video import VIDEO_EXTS


# --- LLaVA records --------------------------------------------------------------------------
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
                        raise DataError(f"{path}:{line_no}: not valid JSON ({error})") from error
            return records
        try:
            records = json.load(handle)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, found {type(records).__name__}")
    return records


def record_images(record: dict[str, Any], key: str = "?") -> list[Any]:
    """The image paths of a record: `image` may be absent, a string or a list of strings."""
    image = record.get("image", record.get("images"))
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    if not isinstance(image, list):
        raise BadSampleError(key, "malformed record", f"image {image!r} is not a path or a list")
    return image


def image_inside(root: str | os.PathLike, rel: Any, key: str) -> Path:
    """`root / rel`, refused when `rel` is not a string or leads outside `root`."""
    if not isinstance(rel, str) or not rel:
        raise BadSampleError(key, "malformed record", f"image path {rel!r} is not a string")
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise BadSampleError(key, "image outside root", f"{rel!r} leads outside {base}")
    return path


def read_image(path: Path, key: str, what: str, cfg: SampleConfig) -> tuple[str, bytes]:
    """(stored extension, bytes) of one image file, checked like the loader checks it."""
    ext = path.suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTS:
        raise BadSampleError(key, "unsupported image", f"{path}: use .jpg, .png or .webp")
    try:
        if path.stat().st_size > cfg.max_member_bytes:
            raise BadSampleError(key, "over max_member_bytes", f"{path}")
        data = path.read_bytes()
    except OSError as error:
        raise BadSampleError(key, "missing image", f"{path} ({error.strerror})") from error
    width, height = image_header_size(data, key, what)
    if width * height > cfg.max_image_pixels:
        raise BadSampleError(key, "over max_image_pixels", f"{what}: {width}x{height}")
    decode_image(data, key, what)
    return ("jpg" if ext == "jpeg" else ext), data


def record_to_members(
    record: Any, image_root: str | os.PathLike, key: str = "?", cfg: SampleConfig | None = None
) -> dict[str, bytes]:
    """The shard members of one LLaVA record (json + images), or `BadSampleError`."""
    cfg = cfg or SampleConfig()
    if not isinstance(record, dict):
        raise BadSampleError(key, "malformed record", f"a {type(record).__name__}, not an object")
    conversation = record.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        raise BadSampleError(key, "malformed record", "no 'conversations' list")
    images = record_images(record, key)
    if "video" in record:
        if images:
            raise BadSampleError(key, "malformed record", "both 'image' and 'video'")
        return {
            "json": _record_json(record, conversation),
            **_video_member(record, image_root, key, cfg),
        }
    members: dict[str, bytes] = {}
    for i, rel in enumerate(images):
        path = image_inside(image_root, rel, key)
        ext, data = read_image(path, key, f"image {i} ({rel})", cfg)
        members[ext if len(images) == 1 else f"{i}.{ext}"] = data
    try:
        conversation = add_image_placeholders(conversation, len(images), key)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise BadSampleError(key, "placeholder mismatch", str(error)) from error
    return {"json": _record_json(record, conversation), **members}


def _record_json(record: dict[str, Any], conversation: list) -> bytes:
    drop = ("image", "images", "video", "conversations")
    meta = {k: v for k, v in record.items() if k not in drop}
    meta["conversations"] = conversation
    return json.dumps(meta, ensure_ascii=False).encode()


def _video_member(
    record: dict[str, Any], root: str | os.PathLike, key: str, cfg: SampleConfig
) -> dict[str, bytes]:
    path = image_inside(root, record["video"], key)
    ext = path.suffix.lower().lstrip(".")
    if ext not in VIDEO_EXTS:
        raise BadSampleError(key, "unsupported video", f"{path}: use .mp4 or .webm")
    try:
        if path.stat().st_size > cfg.max_member_bytes:
            raise BadSampleError(key, "over max_member_bytes", f"{path}")
        return {ext: path.read_bytes()}
    except OSError as error:
        raise BadSampleError(key, "missing video", f"{path} ({error.strerror})") from error


# --- building -------------------------------------------------------------------------------
@dataclass
class BuildSummary:
    """What a builder did."""

    shards: list[Path] = field(default_factory=list)
    written: int = 0
    images: int = 0
    videos: int = 0
    text_only: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)
    """One line per skipped record: which record and why."""

    def add(self, members: dict[str, bytes]) -> None:
        """Count one written sample."""
        images = sum(ext.rpartition(".")[2] in IMAGE_EXTS for ext in members)
        videos = sum(ext in VIDEO_EXTS for ext in members)
        self.written += 1
        self.images += images
        self.videos += videos
        self.text_only += images + videos == 0
        self.bytes += sum(len(d) for d in members.values())

    def format(self) -> str:
        """A few lines for the console."""
        lines = [
            f"wrote {self.written} samples ({self.images} images, {self.videos} videos, "
            f"{self.text_only} text-only, "
            f"{self.bytes / 1e6:.1f} MB) into {len(self.shards)} shard(s)",
        ]
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
            lines.append(f"skipped {sum(self.skipped.values())} record(s): {reasons}")
            lines += [f"  {line}" for line in self.bad[:20]]
            if len(self.bad) > 20:
                lines.append(f"  ... and {len(self.bad) - 20} more")
        return "\n".join(lines)


def progress(iterable: Iterable, total: int | None, desc: str, enabled: bool, unit: str) -> Any:
    """`iterable` with a tqdm bar on stderr when enabled."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr)


@dataclass(frozen=True)
class ShardOutput:
    """Where and how both builders write: the folder, the shard name prefix, the size limits
    of one shard (`ShardWriter`'s), the progress bar, and the per-sample limits."""

    out_dir: str | os.PathLike
    prefix: str = "shard"
    max_samples: int | None = 1000
    max_bytes: int | None = None
    progress_bar: bool = True
    cfg: SampleConfig | None = None


def write_samples(
    samples: Iterable[tuple[str, Any]],
    total: int | None,
    to_members: Callable[[Any, str, SampleConfig | None], dict[str, bytes]],
    output: ShardOutput,
) -> BuildSummary:
    """Convert each (name, item) with `to_members(item, name, cfg)` and write the members;
    items it refuses (`BadSampleError`) are skipped and listed in the summary."""
    summary = BuildSummary()
    samples = progress(samples, total, "shards", output.progress_bar, "sample")
    with ShardWriter(output.out_dir, output.prefix, output.max_samples, output.max_bytes) as writer:
        for where, item in samples:
            try:
                members = to_members(item, where, output.cfg)
            except BadSampleError as error:
                summary.skipped[error.reason] += 1
                summary.bad.append(str(error))
                continue
            writer.write(members)
            summary.add(members)
    summary.shards = writer.paths
    return summary


def build_shards(
    records: Sequence[Any], image_root: str | os.PathLike, output: ShardOutput
) -> BuildSummary:
    """Write LLaVA-style `records` with their images from `image_root` as shards."""
    numbered = (
        (f"record {n} (id {r.get('id', '?') if isinstance(r, dict) else '?'})", r)
        for n, r in enumerate(records)
    )

    def to_members(record: Any, where: str, cfg: SampleConfig | None) -> dict[str, bytes]:
        return record_to_members(record, image_root, where, cfg)

    return write_samples(numbered, len(records), to_members, output)


def img2dataset_samples(root: str | os.PathLike) -> Iterator[tuple[str, Path]]:
    """(name, image path) of each sample of an img2dataset "files" output folder, sorted."""
    root = Path(root)
    if any(root.glob("*.tar")):
        raise DataError(
            f"{root} holds .tar files: img2dataset's webdataset output is already shards; "
            "point data.shards at it (indexes are built on first use)"
        )
    images = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    if not images:
        raise DataError(f"{root}: no images found (expected img2dataset's 'files' output)")
    for path in images:
        yield str(path.relative_to(root)), path


def caption_members(path: Path, where: str, cfg: SampleConfig | None = None) -> dict[str, bytes]:
    """The members of one img2dataset sample: image, `.txt` caption, optional `.json`."""
    cfg = cfg or SampleConfig()
    ext, data = read_image(path, where, "image", cfg)
    caption = path.with_suffix(".txt")
    if not caption.is_file():
        raise BadSampleError(where, "missing member", f"no caption {caption.name}")
    members = {ext: data, "txt": caption.read_bytes()}
    meta = path.with_suffix(".json")
    if meta.is_file():
        members["json"] = meta.read_bytes()
    return members


def build_caption_shards(root: str | os.PathLike, output: ShardOutput) -> BuildSummary:
    """Write an img2dataset "files" output folder as caption shards."""
    return write_samples(img2dataset_samples(root), None, caption_members, output)
