"""The CPU resize gives InternVL's tiles within 2 uint8 levels for every aspect change.

The oracle is Pillow itself: InternVL's `dynamic_preprocess` + its training transform's resize,
re-implemented only as the sequence of PIL calls they make (`reference_dynamic_preprocess`),
on generated noise (every pixel independent: the hardest case for rounding differences).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_internvl.data.pixels import resize_bicubic, tile_image, vertical_pass_first
from megatron_internvl.data.tiler import ImageJob, ImageTiler, TilerConfig
from megatron_internvl.data.tiling import choose_grid
from tests.test_data_dali import S, reference_dynamic_preprocess

# (width, height) per shape class, with the grid and the axes each resize grows or shrinks.
SHAPES = {
    # grid (1, 2): width 430 -> 448 grows, height 1000 -> 896 shrinks (thumbnail too)
    "up one axis, down the other": [(430, 1000), (1000, 430), (300, 1000)],
    "tiny": [(7, 5), (33, 17), (1, 40)],
    # (12, 1) growing both axes; (11, 1): width 4900 -> 4928 grows, height 450 -> 448 shrinks
    "panorama": [(4000, 300), (2500, 120), (4900, 450)],
    # A4 at 150 dpi -> (1, 3); a receipt -> (1, 12)
    "tall document": [(1240, 3508), (700, 6000)],
    "photo": [(640, 480), (1024, 768), (451, 300)],
}


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def internvl_tiles(image_hwc: np.ndarray) -> np.ndarray:
    """uint8 [n, S, S, 3] as InternVL makes them: dynamic_preprocess, then T.Resize per tile."""
    tiles = reference_dynamic_preprocess(Image.fromarray(image_hwc))
    resized = [t.resize((S, S), Image.Resampling.BICUBIC) for t in tiles]
    return np.stack([np.asarray(t) for t in resized])


def levels_off(ours: torch.Tensor, reference: np.ndarray) -> int:
    assert tuple(ours.shape) == reference.shape
    return int(np.abs(ours.numpy().astype(np.int16) - reference.astype(np.int16)).max())


@pytest.mark.parametrize("shape_class", list(SHAPES))
def test_tiles_within_two_levels_of_internvls_pil_path(shape_class):
    worst = 0
    for width, height in SHAPES[shape_class]:
        image = noise(width, height)
        grid = choose_grid(width, height)
        ours = tile_image(torch.from_numpy(image), grid, S, grid[0] * grid[1] > 1)
        off = levels_off(ours, internvl_tiles(image))
        assert off <= 2, f"{width}x{height} -> {grid}: {off} levels"
        worst = max(worst, off)
    print(f"\n{shape_class}: max {worst} levels")


@pytest.mark.parametrize(
    "size, new_size",
    [((300, 1000), (448, 448)), ((1000, 430), (896, 448)), ((430, 1000), (448, 896)),
     ((4000, 300), (5376, 448)), ((120, 2500), (448, 448)), ((700, 6000), (448, 5376))],
)  # fmt: skip
def test_pass_order_is_the_installed_pillows(size, new_size):
    """Pillow's one resize equals its two one-axis resizes in the order `vertical_pass_first`
    predicts, bit for bit, and differs in the other order (each pass rounds to uint8): the rule
    follows the installed Pillow. The resize then matches it within 2 levels."""
    pil = Image.fromarray(noise(*size))
    (width, height), (new_width, new_height) = size, new_size
    vertical = pil.resize((width, new_height), Image.Resampling.BICUBIC)
    horizontal = pil.resize((new_width, height), Image.Resampling.BICUBIC)
    by_rows = np.asarray(vertical.resize(new_size, Image.Resampling.BICUBIC))
    by_cols = np.asarray(horizontal.resize(new_size, Image.Resampling.BICUBIC))
    direct = np.asarray(pil.resize(new_size, Image.Resampling.BICUBIC))
    first, other = by_cols, by_rows
    if vertical_pass_first(*size, *new_size):
        first, other = by_rows, by_cols
    assert np.array_equal(direct, first)
    assert not np.array_equal(direct, other)
    ours = resize_bicubic(torch.from_numpy(noise(*size)), *new_size)
    assert levels_off(ours, direct) <= 2


def test_tiler_host_path_is_within_two_levels_on_every_class():
    """Through `ImageTiler` (DALI decodes lossless PNGs, host threads resize): one image of
    each class in one batch."""
    images = [noise(*shapes[0], seed=i) for i, shapes in enumerate(SHAPES.values())]
    encoded = []
    for image in images:
        with io.BytesIO() as buffer:
            Image.fromarray(image).save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
    tiles = ImageTiler(TilerConfig(batch_size=len(images))).tile(
        [ImageJob(data, 12) for data in encoded]
    )
    for image, ours in zip(images, tiles, strict=True):
        assert levels_off(ours, internvl_tiles(image)) <= 2, image.shape
