"""Tile pixels, shared by both DALI pipelines: host resize, tile cutting, normalisation.

Tiles travel as uint8 `tiles_u8` [n, S, S, 3] (HWC, as decoders, resizers and JPEG codecs work;
a quarter of float32's memory in the packer's open rows) and become the model's float32
[N, 3, S, S] input once per micro-batch, in `normalize_tiles`, whose converting copy also does
the one transposition to CHW (measured: a CHW <-> HWC copy costs as much as a third of a tile's
JPEG re-compression, so the host path avoids every other one).

`resize_bicubic` is InternVL's resize on the CPU: torch's antialiased bicubic for uint8 images
uses PIL's filter (a = -0.5, support widened by the downscale factor) and PIL's fixed-point
arithmetic with a rounding step between the two passes, in AVX2; the pass order is Pillow's
(`vertical_pass_first`). Measured on the benchmark's photos: 3-6x faster per core than PIL's
resize and 2-3x faster than DALI's CPU resize, and within 2 uint8 levels of PIL (mean
difference ~0.003 levels), where DALI's float intermediates are up to ~20 levels apart (see
`tests/test_data_tiler.py`); on noise images of every aspect class within 2 levels too
(`tests/test_data_pixels.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL
import torch

from megatron_internvl.data.tiling import Grid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pillow_version() -> tuple[int, int]:
    major, minor = PIL.__version__.split(".")[:2]
    return int(major), int(minor)


def vertical_pass_first(width: int, height: int, new_width: int, new_height: int) -> bool:
    """Whether the installed Pillow resizes `width` x `height` to `new_width` x `new_height`
    with its vertical pass first. Each pass rounds to uint8, so the order moves values by up to
    ~16 levels where one axis grows and the other shrinks (measured on noise). Pillow >= 13
    (ImagingResampleInner) goes vertical first when the height shrinks by more than twice what
    the width does; 12.2-12.x (Image.resize) when the image is over 100x taller than wide and
    the height shrinks; older versions always horizontal first, as torch's kernel does."""
    shrink = height - new_height
    version = _pillow_version()
    if version >= (13, 0):
        return shrink > 0 and shrink > (width - new_width) * 2
    if version >= (12, 2):
        return shrink > 0 and height > width * 100
    return False


def _resize_u8(image_hwc: torch.Tensor, width: int, height: int) -> torch.Tensor:
    # Channels-last views in and out (no copies): the uint8 SIMD kernel works on interleaved
    # RGB and, given a channels-last `out`, skips its conversion to planes (same values as
    # F.interpolate, which returns planes, and ~40% faster; the tiler test checks both).
    out = torch.empty((1, height, width, 3), dtype=torch.uint8)
    torch.ops.aten._upsample_bicubic2d_aa.out(
        image_hwc.permute(2, 0, 1).unsqueeze(0),
        [height, width],
        False,
        None,
        None,
        out=out.permute(0, 3, 1, 2),
    )
    return out[0]


def resize_bicubic(image_hwc: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """PIL's antialiased bicubic resize of a uint8 [H, W, 3] image: [height, width, 3].

    torch's kernel runs the horizontal pass first (and skips a pass whose axis keeps its size);
    where Pillow runs the vertical pass first, so does this, as two one-axis resizes."""
    rows, cols = image_hwc.shape[:2]
    if rows != height and cols != width and vertical_pass_first(cols, rows, width, height):
        image_hwc = _resize_u8(image_hwc, cols, height)
    return _resize_u8(image_hwc, width, height)


def cut_tiles(
    grid_hwc: torch.Tensor, thumb_hwc: torch.Tensor | None, grid: Grid, image_size: int
) -> torch.Tensor:
    """Row-major tiles of a [rows*S, cols*S, 3] image, then the thumbnail: uint8 [n, S, S, 3]."""
    cols, rows = grid
    expected = (rows * image_size, cols * image_size, 3)
    if tuple(grid_hwc.shape) != expected:
        raise ValueError(f"cut_tiles: image shape {tuple(grid_hwc.shape)} != {expected}")
    n = cols * rows
    out = torch.empty(
        (n + (thumb_hwc is not None), image_size, image_size, 3),
        dtype=grid_hwc.dtype,
        device=grid_hwc.device,
    )
    blocks = grid_hwc.view(rows, image_size, cols, image_size, 3).permute(0, 2, 1, 3, 4)
    tiles = out[:n].view(rows, cols, image_size, image_size, 3)
    if out.is_cuda:
        tiles.copy_(blocks)
        if thumb_hwc is not None:
            out[n].copy_(thumb_hwc)
        return out
    # numpy on the CPU (rows of 3*S bytes): the tiler calls this from its own threads, where
    # torch's OpenMP teams (one per calling thread, spinning after each op) doubled the CPU time.
    np.copyto(tiles.numpy(), blocks.numpy())
    if thumb_hwc is not None:
        np.copyto(out[n].numpy(), thumb_hwc.numpy())
    return out


def tile_image(
    image_hwc: torch.Tensor, grid: Grid, image_size: int, thumbnail: bool
) -> torch.Tensor:
    """InternVL's `dynamic_preprocess` on the CPU: uint8 [H, W, 3] -> tiles_u8 [n, S, S, 3]
    (resize to the grid, cut row-major, then the thumbnail when asked)."""
    cols, rows = grid
    grid_hwc = resize_bicubic(image_hwc, cols * image_size, rows * image_size)
    thumb = resize_bicubic(image_hwc, image_size, image_size) if thumbnail else None
    return cut_tiles(grid_hwc, thumb, grid, image_size)


_AFFINE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _affine(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _AFFINE:
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
        # (v / 255 - mean) / std = v * scale + shift; computed in float64, rounded once.
        scale = (1.0 / (255.0 * std)).to(torch.float32).view(3, 1, 1)
        shift = (-mean / std).to(torch.float32).view(3, 1, 1)
        _AFFINE[device] = (scale.to(device), shift.to(device))
    return _AFFINE[device]


def _storage_users(tensor: torch.Tensor) -> int | None:
    """Tensors (views, autograd's saved inputs) sharing `tensor`'s memory, or None where this
    torch cannot say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    return count(tensor.untyped_storage()._cdata) - 1  # less the storage object asked here


class BatchBuffers:
    """Recycled memory for the float micro-batches on the CPU. A fresh ~100 MB tensor per
    micro-batch is paid in page faults: 1.4 ms of CPU per 448 px tile against 0.3 ms into
    memory already touched (measured). A buffer is handed out again only once nothing else
    holds its memory: the step, autograd's saved input and the prefetch queue have all let go
    of the batch (torch's storage use count); else a new one is made (at most `keep` kept)."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.buffers: list[torch.Tensor] = []

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised float32 CPU tensor of `shape`."""
        numel = int(np.prod(shape))
        free = [b for b in self.buffers if b.numel() >= numel and _storage_users(b) == 1]
        if free:
            return min(free, key=torch.Tensor.numel)[:numel].view(shape)
        fresh = torch.empty(numel, dtype=torch.float32)
        if _storage_users(fresh) is not None:  # reusable only where the count can be read
            idle = [b for b in self.buffers if _storage_users(b) == 1]
            if len(self.buffers) >= self.keep and idle:
                smallest = min(idle, key=torch.Tensor.numel)  # dropped by identity, not value
                self.buffers = [b for b in self.buffers if b is not smallest]
            if len(self.buffers) < self.keep:
                self.buffers.append(fresh)
        return fresh.view(shape)


def normalize_tiles(
    tiles: Sequence[torch.Tensor], buffers: BatchBuffers | None = None
) -> torch.Tensor:
    """uint8 HWC tile tensors -> one float32 [N, 3, S, S] with ImageNet mean/std (on the CPU
    into recycled memory from `buffers` when given).

    Within ~5e-7 of InternVL's `ToTensor` + `Normalize` ((v / 255 - mean) / std in float32).
    Tile by tile (2.4 MB, stays in cache): a converting, transposing copy, then two in-place
    float ops (one mixed-dtype broadcast multiply is ~10x slower in torch on the CPU, measured).
    On the CPU in numpy, one thread: torch's OpenMP split doubled the CPU time here (page faults
    of the fresh tensor dominate), and the loader runs this on a prefetch thread of its own.
    """
    if not tiles:
        raise ValueError("normalize_tiles: no tiles")
    first = tiles[0]
    total = sum(t.shape[0] for t in tiles)
    size = first.shape[1:3]
    shape = (total, 3, *size)
    if buffers is not None and not first.is_cuda:
        out = buffers.take(shape)
    else:
        out = torch.empty(shape, dtype=torch.float32, device=first.device)
    scale, shift = _affine(first.device)
    sources = (t for ts in tiles for t in ts)
    if out.is_cuda:
        for tile, dst in zip(sources, out, strict=True):
            dst.copy_(tile.permute(2, 0, 1)).mul_(scale).add_(shift)
        return out
    scale_np, shift_np = scale.numpy(), shift.numpy()
    for tile, dst in zip(sources, out.numpy(), strict=True):
        dst[...] = tile.numpy().transpose(2, 0, 1)
        dst *= scale_np
        dst += shift_np
    return out
