"""ImageTiler (host-fed DALI) gives exactly TiledImageLoader's grids and tiles, so InternVL's PIL
path within the DALI test's tolerance; it applies each image's cap and quality, and a bad image
costs only itself."""

from __future__ import annotations

import pytest
import torch

from megatron_internvl.data.dali_pipeline import TiledImageLoader, TilingPipelineConfig
from megatron_internvl.data.tiler import ImageDecodeError, ImageJob, ImageTiler, TilerConfig
from megatron_internvl.data.tiling import choose_grid
from tests.test_data_dali import jpeg, photos, write_shard


@pytest.fixture(scope="module")
def encoded():
    return {name: jpeg(array) for name, array in photos().items()}


@pytest.mark.parametrize("quality", [None, 75])
def test_same_tiles_as_the_webdataset_pipeline(tmp_path, encoded, quality):
    tar, index = write_shard(tmp_path / "p-000000.tar", [(n, d, {}) for n, d in encoded.items()])
    q = None if quality is None else (quality, quality)
    loader = TiledImageLoader([tar], [index], TilingPipelineConfig(batch_size=3, jpeg_quality=q))
    reference = [s for batch in loader for s in batch]
    tiler = ImageTiler(TilerConfig(batch_size=3, jpeg_quality=q))
    out = tiler.tile([ImageJob(d, 12, quality or 100) for d in encoded.values()])
    for sample, tiles_nchw in zip(reference, out, strict=True):
        assert torch.equal(sample.tiles_nchw, tiles_nchw), sample.key


def test_each_image_gets_its_own_cap(encoded):
    tiler = ImageTiler(TilerConfig(batch_size=4))
    data = encoded["coffee_strip"]  # 600 x 40
    out = tiler.tile([ImageJob(data, cap) for cap in (12, 6, 1)])
    grids = [choose_grid(600, 40, max_num=cap) for cap in (12, 6, 1)]
    assert grids == [(12, 1), (6, 1), (1, 1)]
    assert [t.shape[0] for t in out] == [13, 7, 1]  # thumbnail only with more than one tile


def test_bad_images_cost_only_themselves(encoded):
    tiler = ImageTiler(TilerConfig(batch_size=4))
    good = [ImageJob(encoded[n], 4) for n in ("astronaut", "chelsea", "coffee")]
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
