"""Reading and writing HF safetensors checkpoints one file at a time.

Reading lists every tensor's name, shape and dtype from the file headers alone (no data), so a
checkpoint is validated before any weight is read; then tensors are read one at a time, in any
order (each read maps its file only while it copies that one tensor out).
Writing plans the shards from shapes first (so names say `-of-N` and each file's header is known
before its data), then writes every tensor into its shard as soon as it is made: no shard is
ever held in memory whole.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from megatron_internvl.checkpoint.errors import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)
"""Files next to the weights that a converted checkpoint carries along unchanged."""

_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise ConversionError(
            f"{path}: cannot read it as safetensors ({error}); the file is truncated or not a "
            f"safetensors file: re-download or re-save it"
        ) from error


class HFSource:
    """The tensors of a safetensors checkpoint directory: names, shapes, dtypes and files."""

    def __init__(self, hf_dir: Path | str) -> None:
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise ConversionError(f"{self.dir}: no such checkpoint directory")
        self.files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            with _open(path) as handle:
                for name in handle.keys():
                    if name in self.tensors:
                        raise ConversionError(
                            f"{path}: tensor {name!r} is also in {self.tensors[name].file.name}; "
                            f"a checkpoint holds each tensor once"
                        )
                    piece = handle.get_slice(name)
                    dtype = _DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise ConversionError(
                            f"{path}: tensor {name!r} has dtype {piece.get_dtype()}; expected "
                            f"one of {sorted(_DTYPES)}"
                        )
                    self.tensors[name] = TensorInfo(path, tuple(piece.get_shape()), dtype)
        self._check_index()

    def _weight_files(self) -> list[Path]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            self.weight_map: dict[str, str] | None = json.loads(index.read_text())["weight_map"]
            names = sorted(set(self.weight_map.values()))
            missing = [n for n in names if not (self.dir / n).is_file()]
            if missing:
                raise ConversionError(
                    f"{index}: lists {missing} but {'it is' if len(missing) == 1 else 'they are'} "
                    f"not in {self.dir}; copy the missing shard files"
                )
            return [self.dir / n for n in names]
        self.weight_map = None
        if (self.dir / SINGLE_NAME).is_file():
            return [self.dir / SINGLE_NAME]
        found = sorted(self.dir.glob("*.safetensors"))
        if not found:
            others = sorted(p.name for p in self.dir.glob("*.bin"))
            raise ConversionError(
                f"{self.dir}: no *.safetensors files (found {others or 'none'}); expected "
                f"{SINGLE_NAME} or shards listed in {INDEX_NAME}. Re-save .bin checkpoints "
                f"with save_pretrained(safe_serialization=True)"
            )
        return found

    def _check_index(self) -> None:
        if self.weight_map is None:
            return
        for name, file in self.weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != file:
                where = "no file" if info is None else info.file.name
                raise ConversionError(
                    f"{self.dir / INDEX_NAME}: says {name!r} is in {file}, but it is in {where}; "
                    f"the index does not match the shards"
                )

    @property
    def dtype(self) -> torch.dtype:
        """The dtype most of the tensors have."""
        counts: dict[torch.dtype, int] = {}
        for info in self.tensors.values():
            counts[info.dtype] = counts.get(info.dtype, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32

    def read(self, name: str) -> torch.Tensor:
        """One tensor, copied out of its file (the file is mapped only during the copy)."""
        path = self.tensors[name].file
        with _open(path) as handle:
            try:
                return handle.get_tensor(name)
            except (SafetensorError, OSError) as error:
                raise ConversionError(f"{path}: cannot read tensor {name!r} ({error})") from error

    def copy_extras(self, out_dir: Path) -> list[str]:
        """Copy tokenizer (and processor) files found next to the weights into `out_dir`."""
        return copy_extras(self.dir, out_dir)


def copy_extras(src: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(src) / name, out_dir / name)
            copied.append(name)
    return copied


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, in order: a new shard starts when the next tensor would pass `max_shard_bytes`
    (a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in sizes:
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def shard_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


class ShardWriter:
    """One safetensors file written tensor by tensor, in the planned order.

    The header (names, dtypes, shapes, byte ranges) is written first from the plan; each tensor
    then goes straight to its place after it, so only the tensor being written is in memory.
    """

    def __init__(
        self, path: Path, planned: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype
    ) -> None:
        itemsize = torch.empty((), dtype=dtype).element_size()
        header: dict[str, dict] = {"__metadata__": {"format": "pt"}}  # transformers checks it
        start = 0
        for name, shape in planned:
            end = start + math.prod(shape) * itemsize
            header[name] = {
                "dtype": _DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [start, end],
            }
            start = end
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format pads the header so data starts aligned
        self.path = path
        self.dtype = dtype
        self._planned = list(planned)
        self._written = 0
        self._file: BinaryIO = open(path, "wb")  # closed by close()
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    @property
    def complete(self) -> bool:
        return self._written == len(self._planned)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, shape = self._planned[self._written]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != self.dtype:
            raise AssertionError(
                f"{self.path.name}: got {name} {tensor.dtype}{list(tensor.shape)}, planned "
                f"{expected} {self.dtype}{list(shape)}"
            )
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(raw.numpy().data)  # little-endian bytes, no copy
        self._written += 1

    def close(self) -> None:
        self._file.close()
        if not self.complete:
            raise AssertionError(f"{self.path.name}: closed after {self._written} tensors")


def write_index(out_dir: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


# --- what AutoProcessor needs next to a native export ----------------------------------------

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# InternVL's image tokens as transformers' InternVLProcessor reads them from the tokenizer.
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
# The `internvl2_5` conversation (ChatML; a default system turn), with an image as the
# `<IMG_CONTEXT>` placeholder that InternVLProcessor expands to <img> + tokens + </img>.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n{{ default_system }}<|im_end|>\n"
    "{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_processor_files(
    out_dir: Path, image_size: int, tokens_per_tile: int, system_prompt: str, max_tiles: int = 12
) -> None:
    """Image processor (InternVL's tiling: square tiles of `image_size`, up to `max_tiles` plus a
    thumbnail, bicubic, ImageNet normalisation), processor config, chat template, and the image
    tokens in the tokenizer config, so that AutoProcessor loads the export."""
    image_processor = {
        "image_processor_type": "GotOcr2ImageProcessor",
        "processor_class": "InternVLProcessor",
        "crop_to_patches": True,
        "min_patches": 1,
        "max_patches": max_tiles,
        "size": {"height": image_size, "width": image_size},
        "resample": 3,  # bicubic, as InternVL's build_transform
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "do_convert_rgb": True,
    }
    processor = {"processor_class": "InternVLProcessor", "image_seq_length": tokens_per_tile}
    for name, record in (
        ("preprocessor_config.json", image_processor),
        ("processor_config.json", processor),
    ):
        (out_dir / name).write_text(json.dumps(record, indent=2) + "\n")
    template = CHAT_TEMPLATE.replace("{{ default_system }}", system_prompt)
    (out_dir / "chat_template.jinja").write_text(template)
    tokenizer_config = out_dir / "tokenizer_config.json"
    if tokenizer_config.is_file():
        record = json.loads(tokenizer_config.read_text())
        record.setdefault("extra_special_tokens", {}).update(IMAGE_TOKENS)
        record["processor_class"] = "InternVLProcessor"
        tokenizer_config.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
