"""Per-sample cost metadata known before decoding: image tiles and LLM tokens, in a side file.

Data-parallel balancing (`data.balance`) deals a step's samples to ranks before anyone decodes
them, so it needs each sample's tiles and tokens up front. Both follow from what a sample's
members say without decoding pixels: the image sizes in their headers give the tile count
(InternVL's dynamic tiling with the run's cap per image, thumbnail included; a video frame is
one tile), and the conversation tokenized with the run's tokenizer and those tile counts gives
the token count. Both are exact for images and frame members. A video file (.mp4) is not
opened (its frame count needs the container): it is counted at the most frames a sample may
draw (`data.video_frames[1]`), an upper bound, so its row never overflows.

The figures depend on the run's settings (tokenizer, tile caps, prompts, ...), so each shard
gets one side file per settings fingerprint, `<shard>.meta-<fingerprint>.json`, next to its
index: built on first use by one process (the others wait), written atomically. An old shard
folder needs nothing: the first balanced run adds the files (or, on a read-only folder, says
which folder must become writable). Cost per sample: its JSON/caption and image headers are
read (within the `data.max_*` limits), its text tokenized; no pixel is decoded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_internvl.data.chat import tokenize_conversation
from megatron_internvl.data.errors import BadSampleError
from megatron_internvl.data.samples import (
    SampleConfig,
    check_conversation,
    load_json,
    read_sample,
)
from megatron_internvl.data.shard_index import SampleEntry, build_once, read_index
from megatron_internvl.data.shard_reader import ShardReader
from megatron_internvl.data.tiling import per_image_cap, tile_plan
from megatron_internvl.data.video import frame_members, frame_prompt, video_member

META_VERSION = 1
Measured = tuple[int, int] | str
"""(tiles, tokens) of a usable sample, or why it cannot be used (a bad-sample reason)."""


@dataclass(frozen=True)
class MetaSettings:
    """What the tile and token counts depend on (the loader's settings)."""

    sample: SampleConfig
    image_size: int
    max_tiles_per_image: int
    min_tiles: int = 1
    use_thumbnail: bool = True
    tokens_per_tile: int = 256
    system_prompt: str | None = None
    add_bos: bool = False

    def fingerprint(self, tokenizer: Any) -> str:
        """A short hash of these settings and the tokenizer's identity."""
        who = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))
        text = repr((META_VERSION, self, who))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def meta_path(tar_path: str | os.PathLike, fingerprint: str) -> Path:
    """The side file of one shard for one settings fingerprint."""
    return Path(tar_path).with_suffix(f".meta-{fingerprint}.json")


def measure(
    reader: ShardReader, entry: SampleEntry, settings: MetaSettings, tokenizer: Any
) -> Measured:
    """(tiles, tokens) of one sample from its headers and text, or the reason it is bad."""
    try:
        conversation, tiles_per_image = _conversation_and_tiles(reader, entry, settings)
        ids, _ = tokenize_conversation(
            conversation,
            tiles_per_image,
            tokenizer,
            tokens_per_tile=settings.tokens_per_tile,
            system_prompt=settings.system_prompt,
            add_bos=settings.add_bos,
            key=entry.name,
        )
    except BadSampleError as error:
        return error.reason
    except (ValueError, KeyError, TypeError):
        return "placeholder mismatch"
    return sum(tiles_per_image), len(ids)


def _conversation_and_tiles(
    reader: ShardReader, entry: SampleEntry, settings: MetaSettings
) -> tuple[list[dict[str, str]], list[int]]:
    cfg = settings.sample
    exts = entry.members
    if video_member(exts) and not frame_members(exts):  # the upper bound, not decoded
        meta = load_json(reader.read_member(entry, "json", cfg.max_json_bytes, "max_json_bytes"),
                         entry.name, cfg)  # fmt: skip
        if "conversations" not in meta:
            raise BadSampleError(entry.name, "malformed json", "no 'conversations' list")
        frames = cfg.video_frames[1]
        conversation = check_conversation(entry.name, meta["conversations"], cfg)
        return frame_prompt(conversation, frames), [1] * frames
    raw = read_sample(reader, entry, cfg)  # members and image headers: no pixel decoded
    if raw.layout == "video":
        return raw.conversations, [1] * len(raw.images)
    cap = per_image_cap(settings.max_tiles_per_image, max(1, len(raw.images)))
    tiles = [
        tile_plan(w, h, settings.min_tiles, cap, settings.image_size, settings.use_thumbnail)
        for w, h in raw.image_sizes
    ]
    return raw.conversations, [plan.num_tiles for plan in tiles]


def write_meta(
    tar_path: str, target: Path, settings: MetaSettings, tokenizer: Any
) -> list[Measured]:
    """Measure every sample of one shard (index order) and write the side file atomically."""
    reader = ShardReader()
    try:
        measured = [measure(reader, e, settings, tokenizer) for e in read_index(tar_path)]
    finally:
        reader.close()
    record = {"version": META_VERSION, "settings": repr(settings), "samples": measured}
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, target)
    return measured


def _read_meta(path: Path, count: int) -> list[Measured] | None:
    """The side file's samples, or None when it is unusable (then it is rebuilt)."""
    try:
        record = json.loads(path.read_text())
        samples = record["samples"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.get("version") != META_VERSION or len(samples) != count:
        return None
    good = all(isinstance(s, str) or (isinstance(s, list) and len(s) == 2) for s in samples)
    return [s if isinstance(s, str) else (int(s[0]), int(s[1])) for s in samples] if good else None


def shard_meta(tar_path: str, settings: MetaSettings, tokenizer: Any) -> list[Measured]:
    """Per sample of the shard (index order): (tiles, tokens) or a bad-sample reason; read
    from the side file, built first when missing or stale (one process; the others wait)."""
    target = meta_path(tar_path, settings.fingerprint(tokenizer))
    count = len(read_index(tar_path))
    found = _read_meta(target, count) if target.exists() else None
    if found is not None:
        return found
    stale = target.exists()

    def measure_shard(path: Path) -> list[Measured]:
        why = "no side file for these settings yet; tools/balance_meta.py builds them ahead"
        print(f"data: measuring {count} samples of {tar_path} for data.balance ({why})", flush=True)
        return write_meta(tar_path, path, settings, tokenizer)

    built = build_once(
        target,
        measure_shard,
        what=f"the balancing metadata of {tar_path}",
        rebuild=stale,
    )
    found = _read_meta(target, count) if built is None else built
    if found is None:
        raise ValueError(f"{target}: unreadable after it was built; delete it and rerun")
    return found
