"""Video samples the way InternVL 2.5 trains on them: frames sampled uniformly over segments, one
tile each at the tile size (no thumbnail), `Frame-{i}: <image>` lines in place of `<video>`.

A sample holds either a video file (`<key>.mp4` / `<key>.webm`, decoded with PyAV, FFmpeg's
Python bindings: DALI's video decoder needs a GPU build, and this path must also run on CPU
ranks) or pre-extracted frames (`<key>.frame<nnn>.jpg|png|webp`, in number order). As InternVL's
`read_frames_*` do, a frame count is drawn from `[min_frames, max_frames]`, the video is split into
that many equal segments and one frame is drawn from each; the draws are seeded by the sample key
so a sample gives the same frames on every read (exact resume). Work is bounded before decoding:
the stream's frame size against `max_image_pixels`, the frame count against `max_video_frames`,
the chosen frames' pixels against `max_sample_pixels`. Decoded frames go to the tiler as uint8
arrays (re-encoding them for an image decoder cost more than the decoding itself, measured).
"""

from __future__ import annotations

import io
import itertools
import re
import zlib
from collections.abc import Callable, Collection
from typing import Protocol

import numpy as np

from megatron_internvl.data.chat import IMAGE_PLACEHOLDER
from megatron_internvl.data.errors import BadSampleError

VIDEO_EXTS = ("mp4", "webm")
FRAME_MEMBER = re.compile(r"frame(\d+)\.(jpg|jpeg|png|webp)", re.IGNORECASE)
VIDEO_PLACEHOLDER = "<video>"


class VideoLimits(Protocol):
    """The per-sample limits a video is checked against before decoding (`SampleConfig`)."""

    max_image_pixels: int
    max_sample_pixels: int
    max_video_frames: int


def frame_members(exts: Collection[str]) -> list[str]:
    """Pre-extracted frame members (`frame<nnn>.<ext>`), in frame-number order."""
    found = [(int(m.group(1)), ext) for ext in exts if (m := FRAME_MEMBER.fullmatch(ext))]
    return [ext for _, ext in sorted(found)]


def video_member(exts: Collection[str]) -> str | None:
    """The video file member, if any."""
    return next((ext for ext in exts if ext.lower() in VIDEO_EXTS), None)


def frame_indices(num_frames: int, vlen: int, rng: np.random.Generator) -> list[int]:
    """InternVL's `get_frame_indices(sample="rand")`: one random frame per equal segment."""
    count = min(num_frames, vlen)
    bounds = np.linspace(0, vlen, count + 1).astype(int)
    ranges = [(int(start), int(end) - 1) for start, end in itertools.pairwise(bounds)]
    if all(end > start for start, end in ranges):
        return [int(rng.integers(start, end)) for start, end in ranges]
    return sorted(int(i) for i in rng.permutation(vlen)[:count])  # InternVL's fallback


def choose_frames(key: str, vlen: int, frames: tuple[int, int]) -> list[int]:
    """The frame indices of one sample: a count from `frames` (inclusive), then segments."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    low, high = frames
    wanted = int(rng.integers(low, high + 1))
    if vlen <= wanted:
        return list(range(vlen))  # InternVL keeps every frame of a short video
    return frame_indices(wanted, vlen, rng)


def decode_video(
    data: bytes, name: str, picks: Callable[[int], list[int]], limits: VideoLimits
) -> list[np.ndarray]:
    """The chosen frames of an encoded video, uint8 [H, W, 3] RGB as FFmpeg converts them
    (handed to the tiler as they are: no re-encoding). Decoding stops at the last chosen frame."""
    import av  # FFmpeg's bindings; only video samples need them

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            pixels = stream.codec_context.width * stream.codec_context.height
            if pixels > limits.max_image_pixels:
                raise BadSampleError(
                    name,
                    "over max_image_pixels",
                    f"video frames of {pixels} pixels > {limits.max_image_pixels}",
                )
            vlen = sum(1 for packet in container.demux(stream) if packet.size)
            if vlen > limits.max_video_frames:
                raise BadSampleError(
                    name, "over max_video_frames", f"{vlen} > {limits.max_video_frames}"
                )
            wanted = set(picks(vlen))
            if pixels * len(wanted) > limits.max_sample_pixels:
                raise BadSampleError(
                    name,
                    "over max_sample_pixels",
                    f"{len(wanted)} frames of {pixels} pixels > {limits.max_sample_pixels}",
                )
            container.seek(0)
            out = []
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    out.append(np.ascontiguousarray(frame.to_ndarray(format="rgb24")))
                    if len(out) == len(wanted):
                        break
    except BadSampleError:
        raise
    except Exception as error:  # FFmpeg reports damage with many error types
        raise BadSampleError(name, "corrupt video", str(error)[:200]) from error
    if not out:
        raise BadSampleError(name, "corrupt video", "no frame decoded")
    return out


def frame_prompt(conversation: list[dict[str, str]], count: int) -> list[dict[str, str]]:
    """`<video>` (or the first human turn's start) -> `Frame-1: <image>\\n...Frame-n: <image>`
    lines, as InternVL 2.5's fine-tuning code writes them."""
    lines = "\n".join(f"Frame-{i + 1}: {IMAGE_PLACEHOLDER}" for i in range(count)) + "\n"
    turns = [dict(turn) for turn in conversation]
    first = next(t for t in turns if t["from"] == "human")
    if f"{VIDEO_PLACEHOLDER}\n" in first["value"]:
        first["value"] = first["value"].replace(f"{VIDEO_PLACEHOLDER}\n", lines, 1)
    elif VIDEO_PLACEHOLDER in first["value"]:
        first["value"] = first["value"].replace(VIDEO_PLACEHOLDER, lines, 1)
    else:
        first["value"] = lines + first["value"]
    return turns
