"""ImageTiler (host-fed DALI): with DALI's resize it gives exactly TiledImageLoader's grids and
tiles (the shared `image_graph`); with the host resize and per-tile JPEG (the CPU default) it is
within 2 uint8 levels of InternVL's PIL path, and re-compresses tiles as InternVL's training
transform does; it applies each image's cap and quality, and a bad image costs only itself."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_internvl.data.pixels import normalize_tiles
from megatron_internvl.data.tiler import ImageDecodeError, ImageJob, ImageTiler, TilerConfig
from megatron_internvl.data.tiling import choose_grid
from tests.dali_reader import TiledImageLoader, TilingPipelineConfig
from tests.test_data_dali import (
    LEVEL,
    jpeg,
    photos,
    reference_dynamic_preprocess,
    reference_tiles,
    within_tolerance,
    write_shard,
)


@pytest.fixture(scope="module")
def encoded():
    return {name: jpeg(array) for name, array in photos().items()}


def tile_all(cfg: TilerConfig, encoded: dict[str, bytes], quality: int = 100) -> list:
    tiles_u8 = ImageTiler(cfg).tile([ImageJob(d, 12, quality) for d in encoded.values()])
    assert all(t.dtype == torch.uint8 for t in tiles_u8)
    return [normalize_tiles([t]) for t in tiles_u8]


@pytest.mark.parametrize("quality", [None, 75])
def test_dali_resize_gives_the_webdataset_pipelines_tiles(tmp_path, encoded, quality):
    tar, index = write_shard(tmp_path / "p-000000.tar", [(n, d, {}) for n, d in encoded.items()])
    q = None if quality is None else (quality, quality)
    loader = TiledImageLoader([tar], [index], TilingPipelineConfig(batch_size=3, jpeg_quality=q))
    reference = [s for batch in loader for s in batch]
    cfg = TilerConfig(batch_size=3, jpeg_quality=q, resize="dali")
    out = tile_all(cfg, encoded, quality or 100)
    for sample, tiles_nchw in zip(reference, out, strict=True):
        assert torch.equal(sample.tiles_nchw, tiles_nchw), sample.key


def test_host_resize_is_within_two_levels_of_internvl_pil_path(encoded):
    """torch's uint8 bicubic does PIL's fixed-point arithmetic: measured max 2 levels, 0.2-0.5%
    of values off by any level, mean 0.0035 levels (DALI's float resize: up to ~20 levels, mean
    ~0.16, see test_data_dali)."""
    out = tile_all(TilerConfig(batch_size=3), encoded)
    diffs = {}
    for (name, data), tiles_nchw in zip(encoded.items(), out, strict=True):
        reference = reference_tiles(data)
        assert tiles_nchw.shape == reference.shape, name
        diffs[name] = (tiles_nchw - reference).abs().flatten()
    everything = torch.cat(list(diffs.values()))
    off = (everything > 0.5 * LEVEL).float().mean().item()
    print(f"\nhost resize vs PIL: max {everything.max() / LEVEL:.2f} levels, {off:.4%} off")
    assert within_tolerance(diffs)  # the DALI pipeline's bounds, and much tighter ones:
    assert everything.max() <= 2.001 * LEVEL and off < 0.01
    assert everything.mean() < 0.01 * LEVEL


def internvl_tiles_with_jpeg(data: bytes, quality: int) -> torch.Tensor:
    """InternVL's path with its training transform's JPEG step at a fixed quality, per tile."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    tiles = []
    for tile in reference_dynamic_preprocess(image):
        with io.BytesIO() as buffer:
            tile.save(buffer, format="JPEG", quality=quality)
            buffer.seek(0)
            tile = Image.open(buffer).copy()
        tiles.append(torch.from_numpy(np.array(tile)))  # HWC, as the tiler's
    return normalize_tiles([torch.stack(tiles)])


@pytest.mark.parametrize("quality", [75, 95])
def test_host_jpeg_is_internvls_per_tile_recompression(encoded, quality):
    """Host path (DALI re-compresses each tile) vs InternVL's (PIL) at the same quality: 93-98%
    of values identical and a mean difference of 0.02-0.09 levels (JPEG quantisation turns a few
    of the resizers' 1-2 level differences into larger ones), where the re-compression itself
    moves values by 0.4-2.7 levels on average (at most 0.11 of it)."""
    q = (quality, quality)
    host = tile_all(TilerConfig(batch_size=4, jpeg_quality=q), encoded, quality)
    clean = tile_all(TilerConfig(batch_size=4), encoded)
    for (name, data), tiles, plain in zip(encoded.items(), host, clean, strict=True):
        diff = (tiles - internvl_tiles_with_jpeg(data, quality)).abs()
        effect = (tiles - plain).abs().mean()
        assert diff.mean() < 0.15 * LEVEL and diff.mean() < 0.2 * effect, name  # measured 0.11
        assert (diff < 1e-6).float().mean() > 0.9, name
    again = tile_all(TilerConfig(batch_size=4, jpeg_quality=q), encoded, quality)
    assert all(torch.equal(a, b) for a, b in zip(host, again, strict=True))


@pytest.mark.parametrize("resize", ["host", "dali"])
def test_each_image_gets_its_own_cap(encoded, resize):
    tiler = ImageTiler(TilerConfig(batch_size=4, resize=resize))
    data = encoded["coffee_strip"]  # 600 x 40
    out = tiler.tile([ImageJob(data, cap) for cap in (12, 6, 1)])
    grids = [choose_grid(600, 40, max_num=cap) for cap in (12, 6, 1)]
    assert grids == [(12, 1), (6, 1), (1, 1)]
    assert [t.shape[0] for t in out] == [13, 7, 1]  # thumbnail only with more than one tile


def test_bad_images_cost_only_themselves(encoded):
    tiler = ImageTiler(TilerConfig(batch_size=4, jpeg_quality=(90, 90)))
    good = [ImageJob(encoded[n], 4, 90) for n in ("astronaut", "chelsea", "coffee")]
    clean = tiler.tile(good)
    truncated = encoded["coffee"][: len(encoded["coffee"]) // 2]
    jobs = [good[0], ImageJob(b"not an image" * 10, 4), good[1], ImageJob(truncated, 4), good[2]]
    out = tiler.tile(jobs)
    assert [type(r) for r in out] == [
        torch.Tensor, ImageDecodeError, torch.Tensor, ImageDecodeError, torch.Tensor
    ]  # fmt: skip
    assert out[1].index == 1 and "header" in str(out[1])
    assert out[3].index == 3
    assert all(torch.equal(a, b) for a, b in zip(clean, out[::2], strict=True))
    assert tiler.rebuilds >= 1
    assert torch.equal(tiler.tile(good[:1])[0], clean[0])  # the rebuilt pipeline works


def test_host_resize_needs_the_cpu():
    with pytest.raises(ValueError, match="resize='host' runs on the CPU"):
        ImageTiler(TilerConfig(device_id=0, resize="host"))


def test_normalize_tiles_is_internvls_to_tensor_and_normalize():
    from megatron_internvl.data.pixels import IMAGENET_MEAN, IMAGENET_STD

    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), np.uint8))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (tiles.permute(0, 3, 1, 2).float() / 255 - mean) / std  # ToTensor + Normalize
    out = normalize_tiles([tiles[:2], tiles[2:]])
    assert out.dtype == torch.float32 and out.shape == (5, 3, 8, 8)
    assert (out - expected).abs().max() < 1e-6


def test_float_batches_reuse_memory_only_once_nothing_holds_it():
    from megatron_internvl.data.pixels import BatchBuffers

    tiles = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), np.uint8))
    buffers = BatchBuffers(keep=2)
    first = normalize_tiles([tiles], buffers)
    assert torch.equal(first, normalize_tiles([tiles]))  # the values of a fresh tensor
    held = first.data_ptr()
    second = normalize_tiles([tiles[:2]], buffers)  # `first` is still held: other memory
    assert second.data_ptr() != held and torch.equal(second, first[:2])
    view, weight = first[1:], torch.ones(3, 8, 8, requires_grad=True)
    loss = (first * weight).sum()  # autograd keeps `first` for the backward pass
    del first
    third = normalize_tiles([tiles], buffers)
    assert third.data_ptr() not in (held, second.data_ptr())
    del view
    assert normalize_tiles([tiles], buffers).data_ptr() != held  # autograd still holds it
    loss.backward()
    del loss, third
    fourth = normalize_tiles([tiles], buffers)  # released everywhere: recycled, refilled
    assert fourth.data_ptr() == held and torch.equal(fourth, normalize_tiles([tiles]))
    # Full (`keep`) with a small idle buffer: a larger batch takes new memory, which replaces
    # the idle one (buffers of other sizes, as micro-batches' tile counts vary).
    del second
    more = torch.cat([tiles, tiles])
    larger = normalize_tiles([more], buffers)
    assert torch.equal(larger, normalize_tiles([more])) and len(buffers.buffers) == 2
    assert any(b.data_ptr() == larger.data_ptr() for b in buffers.buffers)


@pytest.mark.parametrize("size", [(1344, 896), (448, 448), (5376, 448), (448, 1344), (512, 512)])
def test_resize_bicubic_is_torch_interpolate_written_channels_last(size):
    """`resize_bicubic` calls the aten op with a channels-last `out`; same values as the public
    F.interpolate (antialiased bicubic), here on up- and downscales of a photo."""
    import torch.nn.functional as F

    from megatron_internvl.data.pixels import resize_bicubic

    image = torch.from_numpy(np.ascontiguousarray(photos()["coffee"]))  # 600 x 400
    width, height = size
    ours = resize_bicubic(image, width, height)
    reference = F.interpolate(
        image.permute(2, 0, 1).unsqueeze(0), size=(height, width), mode="bicubic", antialias=True
    )
    assert ours.shape == (height, width, 3) and ours.is_contiguous()
    assert torch.equal(ours, reference[0].permute(1, 2, 0))
