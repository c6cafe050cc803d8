"""The one sample parser: members of a WebDataset sample -> a conversation and its images.

The validator and the loader both call `parse_sample`, so whatever one accepts the other does.
The layout is detected per sample from its members (`<key>.<ext>`; the extension is everything
after the key's first dot):

- conversation, single image: `<key>.{jpg,jpeg,png,webp}` + `<key>.json` holding LLaVA/InternVL
  `conversations` ([{"from": "system"|"human"|"gpt", "value": str}, ...]);
- conversation, several images: `<key>.<n>.<ext>` members, taken in the order of n; or the order
  the JSON's `images` list gives (member extensions, e.g. ["0.jpg", "1.png"]; what
  `tools/build_shards.py` writes). `<image>` placeholders in human turns take the images in
  order; with none, they are prepended InternVL's way (`chat.add_image_placeholders`);
- text-only: `<key>.json` with `conversations` and no image member;
- video: `<key>.mp4|webm` or frames `<key>.frame<nnn>.<ext>` + `<key>.json` with `conversations`
  (a `<video>` placeholder in the first human turn, or none): frames sampled and prompted as
  InternVL 2.5 does (`data/video.py`), one tile each;
- caption (img2dataset): `<key>.<ext>` + `<key>.txt` (+ optional `<key>.json` metadata with no
  `conversations`): a human turn `<image>\\n<prompt>` (a prompt from `caption_prompts`, chosen by
  the key, so it is the same on every read) and the caption as the answer. `caption_min` drops
  samples whose metadata field is missing or below a minimum (e.g. {"width": 256,
  "similarity": 0.28}).

Work per sample is bounded before it is done (`SampleConfig`): member bytes before reading, JSON
bytes, nesting depth and integer digits before and while parsing, characters per turn before
tokenizing, pixels per image and per sample from the image header before decoding. Anything over
a limit, of the wrong type or missing is a `BadSampleError` naming the limit or the field.
"""

from __future__ import annotations

import io
import json
import re
import warnings
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from PIL import Image

from megatron_internvl.config.schema import DataSection
from megatron_internvl.data.chat import IMAGE_PLACEHOLDER, add_image_placeholders
from megatron_internvl.data.errors import BadSampleError, DataError
from megatron_internvl.data.shard_index import SampleEntry
from megatron_internvl.data.shard_reader import BAD_NAME, TAR_ERROR, ShardReader
from megatron_internvl.data.video import (
    choose_frames,
    decode_video,
    frame_members,
    frame_prompt,
    video_member,
)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Image member extensions (last dotted part), the formats DALI and PIL both decode."""
IMAGE_FORMATS = {"JPEG", "PNG", "WEBP"}
"""PIL format names accepted from an image header (a GIF named .jpg is refused)."""
UNSUPPORTED_IMAGE_EXTS = ("gif", "bmp", "tif", "tiff", "avif", "heic", "ico")
ROLES = ("system", "human", "gpt")

DEFAULT_CAPTION_PROMPTS = (
    "Describe this image briefly.",
    "Provide a one-sentence caption for the provided image.",
    "What is shown in this image? Answer in a short sentence.",
    "Write a short caption for this image.",
    "Summarize the visual content of the image.",
)
"""Stage-1 caption prompts (InternVL's pretraining turns captions into short-caption requests)."""

POLICY_REASONS = frozenset({"too many tiles", "filtered"})
"""Skip reasons that are choices of the configuration, not damaged or hostile data."""


@dataclass(frozen=True)
class SampleConfig:
    """What a sample may hold and cost, and how captions become conversations.

    Defaults are sized for InternVL 2.5: 12 tiles of 448 need ~2.4 Mpx; documents and
    panoramas reach ~25 Mpx; a 16k-token row holds ~65k characters.
    """

    caption_prompts: tuple[str, ...] = DEFAULT_CAPTION_PROMPTS
    caption_min: Mapping[str, float] = field(default_factory=dict)
    # The limits' values live once, in the run config's data section (documented there).
    max_member_bytes: int = DataSection.max_member_bytes
    max_json_bytes: int = DataSection.max_json_bytes
    max_json_depth: int = DataSection.max_json_depth
    max_int_digits: int = DataSection.max_int_digits
    max_turn_chars: int = DataSection.max_turn_chars
    max_image_pixels: int = DataSection.max_image_pixels
    max_sample_pixels: int = DataSection.max_sample_pixels
    max_video_frames: int = DataSection.max_video_frames
    video_frames: tuple[int, int] = (8, 32)
    """Frames per video sample are drawn from this inclusive range (InternVL 2.5: 8 to 32)."""

    def __post_init__(self) -> None:
        limits = {k: v for k, v in vars(self).items() if k.startswith("max_")}
        wrong = {k: v for k, v in limits.items() if not isinstance(v, int) or v < 1}
        if wrong:
            raise DataError(f"data: {wrong} must be positive integers")
        low, high = self.video_frames
        if not 1 <= low <= high:
            raise DataError(f"data.video_frames={list(self.video_frames)}: need 1 <= min <= max")


def video_frame_ranges(value: Sequence[Any], datasets: int) -> list[tuple[int, int]]:
    """`data.video_frames` as one (min, max) per dataset: one [min, max] pair for every dataset,
    or one pair per entry of `data.shards` (in order); `DataError` in one line otherwise."""
    found = list(value)
    per_dataset = bool(found) and all(isinstance(p, list | tuple) for p in found)
    pairs = [tuple(p) for p in found] if per_dataset else [tuple(found)]

    def valid(pair: tuple) -> bool:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
        return len(pair) == 2 and ints and 1 <= pair[0] <= pair[1]

    if not all(valid(p) for p in pairs) or (per_dataset and len(pairs) != datasets):
        raise DataError(
            f"data.video_frames={found}: expected [min, max] with 1 <= min <= max for every "
            f"dataset, or one such pair per entry of data.shards ({datasets}), e.g. [8, 32] "
            "or [[8, 32], [4, 16]]"
        )
    return pairs if per_dataset else pairs * datasets


def sample_config(data: Any) -> SampleConfig:
    """The `SampleConfig` of a run's data section (`config.schema.DataSection`); its frame
    range is the first dataset's (the held-out set's, see `video_frame_ranges`)."""
    return SampleConfig(
        caption_prompts=tuple(data.caption_prompts) or DEFAULT_CAPTION_PROMPTS,
        caption_min=dict(data.caption_min),
        video_frames=video_frame_ranges(data.video_frames, max(1, len(data.shards)))[0],
        **{
            f.name: getattr(data, f.name) for f in fields(SampleConfig) if f.name.startswith("max_")
        },
    )


@dataclass
class ParsedSample:
    """A usable sample: its conversation (placeholders in place) and its images in order."""

    name: str
    layout: str
    """"conversation", "caption", "text" or "video" (its images are frames: one tile each)."""
    conversations: list[dict[str, str]]
    images: list[bytes | np.ndarray]
    """Encoded images (members), or a video file's decoded frames (uint8 [H, W, 3] RGB)."""
    image_sizes: list[tuple[int, int]]
    meta: dict[str, Any]


Reader = Callable[[str, int], bytes]
"""read(extension, max_bytes) -> the member's bytes, or `BadSampleError`."""


def parse_sample(name: str, exts: Collection[str], read: Reader, cfg: SampleConfig) -> ParsedSample:
    """Detect the layout, read and check the members; `BadSampleError` when not usable."""
    image_exts = _image_members(name, exts)
    meta: dict[str, Any] = {}
    if "json" in exts:
        meta = load_json(read("json", cfg.max_json_bytes), name, cfg)
    if "conversations" in meta and (video_member(exts) or frame_members(exts)):
        if image_exts:
            raise BadSampleError(name, "ambiguous images", f"video with images {image_exts}")
        return _parse_video(name, exts, meta, read, cfg)
    if "conversations" in meta:
        order = _image_order(name, meta, image_exts, exts)
        conversation = check_conversation(name, meta["conversations"], cfg)
        layout = "conversation" if order else "text"
    elif "txt" in exts and image_exts:
        if len(image_exts) != 1:
            raise BadSampleError(name, "ambiguous images", f"caption with images {image_exts}")
        order = image_exts
        conversation = _caption_conversation(name, read("txt", cfg.max_member_bytes), meta, cfg)
        layout = "caption"
    else:
        raise BadSampleError(name, *_what_is_missing(exts, image_exts))
    images = [read(ext, cfg.max_member_bytes) for ext in order]
    sizes = [image_header_size(data, name, f"image {i} (.{e})") for i, (data, e) in
             enumerate(zip(images, order, strict=True))]  # fmt: skip
    _check_pixels(name, sizes, cfg)
    conversation = _place_images(name, conversation, len(images))
    return ParsedSample(name, layout, conversation, images, sizes, meta)


def _parse_video(
    name: str, exts: Collection[str], meta: dict[str, Any], read: Reader, cfg: SampleConfig
) -> ParsedSample:
    conversation = check_conversation(name, meta["conversations"], cfg)
    if not any(t["from"] == "human" for t in conversation) or any(
        IMAGE_PLACEHOLDER in t["value"] for t in conversation if t["from"] == "human"
    ):
        raise BadSampleError(name, "placeholder mismatch", "a video needs a human turn, no <image>")
    key = name.rpartition(":")[2]
    frames, video = frame_members(exts), video_member(exts)
    if frames and video:
        raise BadSampleError(name, "ambiguous images", f"{video} and frames {frames[:3]}...")
    if frames:
        if len(frames) > cfg.max_video_frames:
            raise BadSampleError(
                name, "over max_video_frames", f"{len(frames)} > {cfg.max_video_frames}"
            )
        picks = choose_frames(key, len(frames), cfg.video_frames)
        images = [read(frames[i], cfg.max_member_bytes) for i in picks]
    else:
        assert video is not None
        decoded = decode_video(
            read(video, cfg.max_member_bytes),
            name,
            lambda vlen: choose_frames(key, vlen, cfg.video_frames),
            cfg,
        )
        sizes = [(frame.shape[1], frame.shape[0]) for frame in decoded]
        return ParsedSample(
            name, "video", frame_prompt(conversation, len(decoded)), list(decoded), sizes, meta
        )
    sizes = [image_header_size(data, name, f"frame {i}") for i, data in enumerate(images)]
    _check_pixels(name, sizes, cfg)
    return ParsedSample(name, "video", frame_prompt(conversation, len(images)), images, sizes, meta)


def _what_is_missing(exts: Collection[str], image_exts: list[str]) -> tuple[str, str]:
    if "json" in exts:
        return "malformed json", "no 'conversations' list (and no .txt caption beside an image)"
    if image_exts:
        return "missing member", "an image with neither .json conversations nor a .txt caption"
    return "missing member", f"no .json or .txt member (members: {sorted(exts)})"


def _image_members(name: str, exts: Collection[str]) -> list[str]:
    """Image member extensions in placeholder order (`<ext>`, or `<n>.<ext>` sorted by n)."""
    bare, numbered, unsupported = [], [], []
    for ext in exts:
        stem, _, last = ext.rpartition(".")
        if last.lower() in UNSUPPORTED_IMAGE_EXTS:
            unsupported.append(ext)
        if last.lower() not in IMAGE_EXTS:
            continue
        if not stem:
            bare.append(ext)
        elif stem.isdigit():
            numbered.append((int(stem), ext))
    if unsupported:
        raise BadSampleError(
            name, "unsupported image", f"{unsupported}: convert to {', '.join(IMAGE_EXTS)}"
        )
    if (bare and numbered) or len(bare) > 1:
        raise BadSampleError(name, "ambiguous images", f"{bare + [e for _, e in numbered]}")
    if len({n for n, _ in numbered}) != len(numbered):
        raise BadSampleError(name, "ambiguous images", f"repeated numbers in {numbered}")
    return bare + [ext for _, ext in sorted(numbered)]


def _image_order(
    name: str, meta: dict[str, Any], image_exts: list[str], exts: Collection[str]
) -> list[str]:
    listed = meta.get("images")
    if listed is None:
        return image_exts
    if not isinstance(listed, list) or not all(isinstance(e, str) for e in listed):
        raise BadSampleError(name, "malformed json", "'images' must be a list of member extensions")
    for i, ext in enumerate(listed):
        if ext not in exts:
            raise BadSampleError(name, "missing image", f"image {i} (.{ext}) is not in the shard")
        if ext.rpartition(".")[2].lower() not in IMAGE_EXTS:
            raise BadSampleError(name, "unsupported image", f"image {i} (.{ext})")
    return list(listed)


def check_conversation(name: str, turns: Any, cfg: SampleConfig) -> list[dict[str, str]]:
    """The conversation's turns as {"from", "value"} strings; `BadSampleError` otherwise."""
    if not isinstance(turns, list) or not turns:
        raise BadSampleError(name, "malformed json", "'conversations' must be a non-empty list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadSampleError(name, "malformed json", f"turn {i} is {type(turn).__name__}")
        role, value = turn.get("from"), turn.get("value")
        if not isinstance(role, str) or role not in ROLES or (role == "system" and i > 0):
            raise BadSampleError(
                name, "malformed json", f"turn {i}: from={role!r}; expected 'human' or 'gpt' "
                "('system' only first)"
            )  # fmt: skip
        if not isinstance(value, str):
            raise BadSampleError(name, "malformed json", f"turn {i}: value is not a string")
        if len(value) > cfg.max_turn_chars:
            raise BadSampleError(
                name, "over max_turn_chars", f"turn {i}: {len(value)} > {cfg.max_turn_chars}"
            )
        out.append({"from": role, "value": value})
    return out


def _place_images(name: str, conversation: list[dict[str, str]], count: int) -> list:
    try:
        return add_image_placeholders(conversation, count, name)
    except ValueError as error:
        detail = str(error).split(": ", 1)[-1]
        raise BadSampleError(name, "placeholder mismatch", detail) from error


def _caption_conversation(
    name: str, text: bytes, meta: dict[str, Any], cfg: SampleConfig
) -> list[dict[str, str]]:
    for key, minimum in cfg.caption_min.items():
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise BadSampleError(name, "filtered", f"metadata {key}={value!r}, need >= {minimum}")
    try:
        caption = text.decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise BadSampleError(name, "malformed caption", f"not UTF-8 ({error})") from error
    if not caption:
        raise BadSampleError(name, "malformed caption", "empty .txt")
    if len(caption) > cfg.max_turn_chars:
        raise BadSampleError(
            name, "over max_turn_chars", f"caption: {len(caption)} > {cfg.max_turn_chars}"
        )
    prompts = cfg.caption_prompts or DEFAULT_CAPTION_PROMPTS
    prompt = prompts[zlib.crc32(name.rpartition(":")[2].encode()) % len(prompts)]
    return [
        {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{prompt}"},
        {"from": "gpt", "value": caption},
    ]


# --- bounded JSON ---------------------------------------------------------------------------
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


class _TooManyDigitsError(ValueError):
    pass


def json_depth(data: bytes) -> int:
    """Nesting depth of JSON text (brackets outside strings), without recursion."""
    if data.count(b"[") + data.count(b"{") <= 1:
        return int(b"[" in data or b"{" in data)
    brackets = np.frombuffer(_JSON_STRING.sub(b"", data), dtype=np.uint8)
    steps = np.isin(brackets, (ord("["), ord("{"))).astype(np.int64)
    steps -= np.isin(brackets, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def load_json(data: bytes, name: str, cfg: SampleConfig) -> dict[str, Any]:
    """A sample's JSON object, parsed only within the size, depth and integer limits."""
    if len(data) > cfg.max_json_bytes:
        raise BadSampleError(name, "over max_json_bytes", f"{len(data)} > {cfg.max_json_bytes}")
    if data.count(b"[") + data.count(b"{") > cfg.max_json_depth:
        depth = json_depth(data)
        if depth > cfg.max_json_depth:
            raise BadSampleError(name, "over max_json_depth", f"{depth} > {cfg.max_json_depth}")

    def bounded_int(text: str) -> int:
        if len(text.lstrip("-")) > cfg.max_int_digits:
            raise _TooManyDigitsError(f"an integer of {len(text)} digits > {cfg.max_int_digits}")
        return int(text)

    try:
        meta = json.loads(data.decode("utf-8"), parse_int=bounded_int)
    except _TooManyDigitsError as error:
        raise BadSampleError(name, "over max_int_digits", str(error)) from error
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise BadSampleError(name, "malformed json", str(error)[:200]) from error
    if not isinstance(meta, dict):
        raise BadSampleError(
            name, "malformed json", f"expected an object, found {type(meta).__name__}"
        )
    return meta


# --- images ---------------------------------------------------------------------------------
def image_header_size(data: bytes, name: str, what: str = "image") -> tuple[int, int]:
    """(width, height) from the encoded header, no pixel decoding; format checked."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                size, fmt = image.size, image.format
    except Image.DecompressionBombError as error:
        raise BadSampleError(name, "over max_image_pixels", f"{what}: {error}") from error
    except Exception as error:  # PIL raises many types for bad data
        raise BadSampleError(name, "corrupt image", f"{what}: {error}") from error
    if fmt not in IMAGE_FORMATS:
        raise BadSampleError(name, "unsupported image", f"{what} is {fmt}; use JPEG, PNG or WebP")
    return size


def _check_pixels(name: str, sizes: list[tuple[int, int]], cfg: SampleConfig) -> None:
    for i, (width, height) in enumerate(sizes):
        if width * height > cfg.max_image_pixels:
            raise BadSampleError(
                name,
                "over max_image_pixels",
                f"image {i} is {width}x{height} > {cfg.max_image_pixels} pixels",
            )
    total = sum(w * h for w, h in sizes)
    if total > cfg.max_sample_pixels:
        raise BadSampleError(
            name, "over max_sample_pixels", f"{total} pixels > {cfg.max_sample_pixels}"
        )


def decode_image(data: bytes, name: str, what: str = "image") -> None:
    """Fully decode an image with PIL (after the header checks); `BadSampleError` if it fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # a truncated JPEG raises here (LOAD_TRUNCATED_IMAGES is off)
    except Exception as error:  # PIL raises many types for bad data
        raise BadSampleError(name, "corrupt image", f"{what}: {error}") from error


# --- the two callers' views -----------------------------------------------------------------
def read_sample(reader: ShardReader, entry: SampleEntry, cfg: SampleConfig) -> ParsedSample:
    """The loader's view: a sample by its index entry (members read on demand, bounded)."""
    if entry.problem is not None:
        raise BadSampleError(entry.name, "bad index entry", entry.problem)

    def read(ext: str, limit: int) -> bytes:
        return reader.read_member(entry, ext, limit, _limit_name(ext))

    return parse_sample(entry.name, entry.members, read, cfg)


def _limit_name(ext: str) -> str:
    return "max_json_bytes" if ext == "json" else "max_member_bytes"


def check_tar_sample(name: str, members: dict[str, bytes], cfg: SampleConfig) -> ParsedSample:
    """The validator's view: a sample read from the tar in order, its images fully decoded."""
    if TAR_ERROR in members:
        raise BadSampleError(name, "truncated tar", members[TAR_ERROR].decode())
    if BAD_NAME in members:
        raise BadSampleError(
            name, "bad member name", f"{members[BAD_NAME].decode()!r} holds whitespace"
        )
    too_big = [ext for ext in members if ext.startswith("__too_big__.")]
    if too_big:
        ext = too_big[0].split(".", 1)[1]
        size = members[too_big[0]].decode()
        raise BadSampleError(name, f"over {_limit_name(ext)}", f".{ext} is {size} bytes")

    def read(ext: str, limit: int) -> bytes:
        if ext not in members:
            raise BadSampleError(name, "missing member", f"no .{ext} member in the shard")
        if len(members[ext]) > limit:
            raise BadSampleError(
                name, f"over {_limit_name(ext)}",
                f".{ext} is {len(members[ext])} bytes > {limit}",
            )  # fmt: skip
        return members[ext]

    sample = parse_sample(name, members, read, cfg)
    for i, data in enumerate(sample.images):
        if isinstance(data, bytes):  # a video file's frames are decoded already
            decode_image(data, name, f"image {i}")
    return sample
