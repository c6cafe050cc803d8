"""One shard per hostile or damaged input of issue 17, built here (tests and the memory benchmark
share them). Each shard holds a good sample, the hostile one, and two more good ones."""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import skimage.data
from PIL import Image

from megatron_internvl.data.shard_index import index_path
from megatron_internvl.data.shard_writer import ShardWriter


def jpeg(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).resize(size).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose header declares width x height (decoding it would need the memory)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:20], data[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # IHDR chunk CRC
    return bytes(data)


def conversation(question: str = "<image>\nWhat is it?", **extra) -> bytes:
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "A cat."}]
    return json.dumps({"conversations": turns, **extra}).encode()


GOOD = {"jpg": jpeg(), "json": conversation()}


@dataclass(frozen=True)
class Case:
    """A hostile sample, the reason both paths give, and an optional damage to the index."""

    members: dict[str, bytes]
    reason: str
    damage_index: Callable[[list[str]], list[str]] | None = None
    """Rewrites the index lines (header first) after the shard is written."""


def _index_line_for_sample(lines: list[str], edit: Callable[[list[str]], list[str]]) -> list[str]:
    fields = lines[2].split()  # line 0: header; line 1: the first good sample; 2: the hostile one
    return [*lines[:2], " ".join(edit(fields)), *lines[3:]]


def _huge_size(fields: list[str]) -> list[str]:
    return [*fields[:2], str(1 << 40), *fields[3:]]


def _negative_offset(fields: list[str]) -> list[str]:
    return [fields[0], "-512", *fields[2:]]


def _space_in_name(fields: list[str]) -> list[str]:
    return [*fields[:3], fields[3].replace(".", " x.", 1), *fields[4:]]


CASES: dict[str, Case] = {
    "png_bomb_13000": Case({"png": png_declaring(13000, 13000), "json": conversation()},
                           "over max_image_pixels"),
    "four_large_images": Case(
        {**{f"{i}.png": png_declaring(5000, 5000) for i in range(4)},
         "json": conversation("<image>" * 4)},
        "over max_sample_pixels",
    ),
    "json_5mb_small_objects": Case(
        {"json": conversation(extra=[{"a": 1}] * 600_000)}, "over max_json_bytes"
    ),
    "turn_200k_chars": Case({"json": conversation("word " * 40_000)}, "over max_turn_chars"),
    "json_nested_100k": Case({"json": b'{"conversations": []' + b', "x": ' + b"[" * 100_000
                              + b"]" * 100_000 + b"}"}, "over max_json_depth"),
    "int_5000_digits": Case({"json": conversation()[:-1] + b', "n": ' + b"9" * 5000 + b"}"},
                            "over max_int_digits"),
    "from_is_a_list": Case(
        {"json": b'{"conversations": [{"from": ["gpt"], "value": "x"}]}'}, "malformed json"
    ),
    "index_huge_size": Case(GOOD, "over max_member_bytes", lambda lines: _index_line_for_sample(
        lines, _huge_size)),
    "index_negative_offset": Case(GOOD, "bad index entry", lambda lines: _index_line_for_sample(
        lines, _negative_offset)),
    "index_name_with_space": Case(GOOD, "bad index entry", lambda lines: _index_line_for_sample(
        lines, _space_in_name)),
}  # fmt: skip
"""Name -> case. Index cases hold a good sample whose index line is damaged: the validator
reads the tar (the sample is good there) and reports the index; the loader skips the sample."""


def write_case(out_dir: Path, name: str) -> tuple[str, list[str]]:
    """The shard of one case ([good, hostile, good, good]) and its sample keys."""
    case = CASES[name]
    with ShardWriter(out_dir, name, max_samples=None) as writer:
        keys = [writer.write(members) for members in (GOOD, case.members, GOOD, GOOD)]
    shard = str(writer.paths[0])
    if case.damage_index is not None:
        idx = index_path(shard)
        idx.write_text("\n".join(case.damage_index(idx.read_text().splitlines())) + "\n")
    return shard, keys
