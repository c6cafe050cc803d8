"""The DALI pipeline reads sharded WebDataset tars and yields InternVL's grids and tiles (within a
measured bicubic tolerance of InternVL's PIL path), and fails loudly, naming candidates, on a
corrupt JPEG."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import skimage.data
import torch
import webdataset as wds
from PIL import Image

from megatron_internvl.data.pixels import IMAGENET_MEAN, IMAGENET_STD
from megatron_internvl.data.shard_index import write_index
from tests.dali_reader import ShardDecodeError, TiledImageLoader, TilingPipelineConfig
from tests.test_data_tiling import random_sizes, reference_grid

S = 448
# One uint8 step after normalisation, for the channel with the smallest std (the largest step).
LEVEL = 1 / 255 / min(IMAGENET_STD)


# --- InternVL's PIL path, transcribed (torchvision-free transform) -------------------------------
def reference_dynamic_preprocess(
    image, min_num=1, max_num=12, image_size=S, use_thumbnail=True, resample=None
):
    # InternVL calls image.resize(size) and relies on Pillow's default, BICUBIC; `resample`
    # exists only so a test can check that another filter is caught.
    resample = Image.Resampling.BICUBIC if resample is None else resample
    orig_width, orig_height = image.size
    target_aspect_ratio = reference_grid(orig_width, orig_height, min_num, max_num, image_size)
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height), resample)
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        processed_images.append(resized_img.crop(box))
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size), resample))
    return processed_images


def reference_tiles(jpeg_bytes, resample=None):
    """tiles_nchw from PIL: decode, tile, resize to S (a no-op here), to tensor, normalise."""
    image = Image.open(io.BytesIO(jpeg_bytes)).convert("RGB")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    tiles = []
    for tile in reference_dynamic_preprocess(image, resample=resample):
        tile = tile.resize((S, S), Image.Resampling.BICUBIC)
        chw = torch.from_numpy(np.array(tile)).permute(2, 0, 1).float() / 255.0
        tiles.append((chw - mean) / std)
    return torch.stack(tiles)


# --- shards -------------------------------------------------------------------------------------
def jpeg(array_hwc, quality=95):
    buffer = io.BytesIO()
    Image.fromarray(array_hwc).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def resized(array_hwc, size):
    return np.asarray(Image.fromarray(array_hwc).resize(size, Image.Resampling.LANCZOS))


def write_shard(path, samples):
    """samples: [(key, jpeg bytes, meta dict)]; writes the tar and its DALI index."""
    with wds.TarWriter(str(path)) as writer:
        for key, image, meta in samples:
            writer.write({"__key__": key, "jpg": image, "json": json.dumps(meta).encode()})
    index = path.with_suffix(".idx")
    write_index(path, index)
    return str(path), str(index)


def photos():
    """Real photographs at sizes that exercise down- and up-scaling and extreme aspect ratios."""
    astronaut, chelsea, coffee = (
        skimage.data.astronaut(),
        skimage.data.chelsea(),
        skimage.data.coffee(),
    )
    return {
        "astronaut": astronaut,  # 512x512 -> (1,1), slight downscale
        "chelsea": chelsea,  # 451x300 -> (3,2), upscale
        "coffee": coffee,  # 600x400 -> (3,2), upscale
        "astronaut_big": resized(astronaut, (2600, 1700)),  # -> (3,2), downscale
        "astronaut_tall": resized(astronaut, (1800, 3000)),  # -> (2,3), downscale
        "coffee_strip": coffee[180:220],  # 600x40 -> (12,1), 11x vertical upscale
        "chelsea_column": chelsea[:, 200:300],  # 100x300 -> (1,3), upscale
    }


@pytest.fixture(scope="module")
def photo_shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    encoded = {name: jpeg(array) for name, array in photos().items()}
    samples = [(name, data, {"name": name}) for name, data in encoded.items()]
    return write_shard(root / "photos-000000.tar", samples), encoded


def run_epoch(paths, index_paths, **overrides):
    cfg = TilingPipelineConfig(**{"batch_size": 4, **overrides})
    loader = TiledImageLoader(paths, index_paths, cfg)
    batches = list(loader)
    assert len(batches) == len(loader)
    return [sample for batch in batches for sample in batch]


# --- tests --------------------------------------------------------------------------------------
def test_grid_choice_matches_internvl_on_40_sizes(tmp_path):
    # 40 random aspect ratios across 20x500 .. 4000x300 (areas kept small: decoding on 2 cores)
    # and the exact ties of the tie rule.
    sizes = [
        *random_sizes(40, seed=3, max_area=1_200_000),
        *[(896, 896), (448, 448), (2000, 1000), (1000, 500), (20, 500), (4000, 300)],
    ]
    base = skimage.data.coffee()
    samples = [
        (f"s{k:03d}", jpeg(resized(base, size), 85), {"wh": size}) for k, size in enumerate(sizes)
    ]
    shard = write_shard(tmp_path / "sizes-000000.tar", samples)
    out = run_epoch([shard[0]], [shard[1]], batch_size=8)
    assert len(out) == len(sizes) >= 40
    for sample in out:
        width, height = json.loads(sample.meta)["wh"]
        grid = reference_grid(width, height)
        assert sample.grid == tuple(grid), (width, height)
        tiles = grid[0] * grid[1] + (grid[0] * grid[1] > 1)
        assert tuple(sample.tiles_nchw.shape) == (tiles, 3, S, S)


def tile_differences(samples, encoded, resample=None):
    diffs = {}
    for sample in samples:
        name = json.loads(sample.meta)["name"]
        reference = reference_tiles(encoded[name], resample)
        assert sample.tiles_nchw.shape == reference.shape, name
        assert sample.tiles_nchw.dtype == torch.float32
        diffs[name] = (sample.tiles_nchw.cpu() - reference).abs().flatten()
    return diffs


def within_tolerance(diffs):
    """Is DALI's output InternVL's, up to the difference between the two bicubic resizers?

    Decoding is bit-identical (libjpeg-turbo in both; measured). The resizers differ: PIL rounds
    and clips to uint8 between its horizontal and vertical passes, DALI keeps floats. Rounding
    moves almost every pixel by at most one level (mean and 99.9th percentile bounds). Clipping
    makes the tail: the cubic (a = -0.5) overshoots a step by at most 7.4% (kernel minimum
    -0.074 at |x| = 4/3), so PIL can lose up to 0.074 * 255 = 18.9 levels in the intermediate,
    which the second pass (positive weights summing to <= 1.074) carries into at most
    20.3 levels, plus one of rounding: the max bound is 22 levels.
    """
    everything = torch.cat(list(diffs.values()))
    return bool(
        everything.mean() < 0.25 * LEVEL
        and np.quantile(everything.numpy(), 0.999) <= 1.001 * LEVEL
        and everything.max() <= 22 * LEVEL
    )


@pytest.fixture(scope="module")
def photo_tiles(photo_shard):
    (tar, index), encoded = photo_shard
    samples = run_epoch([tar], [index])
    assert sorted(json.loads(s.meta)["name"] for s in samples) == sorted(encoded)
    return samples


def test_tiles_match_internvl_pil_path_within_bicubic_tolerance(photo_shard, photo_tiles):
    diffs = tile_differences(photo_tiles, photo_shard[1])
    for name, diff in diffs.items():
        print(
            f"\n{name:15s} max {diff.max():.4f} ({diff.max() / LEVEL:.1f} levels) "
            f"mean {diff.mean():.5f} p99.9 {np.quantile(diff.numpy(), 0.999):.4f}",
            end="",
        )
    worst = torch.cat(list(diffs.values())).max().item()
    print(f"\nDALI vs PIL over all tiles: max {worst:.4f} = {worst / LEVEL:.1f} uint8 levels")
    assert within_tolerance(diffs)


@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.LANCZOS])
def test_tolerance_rejects_a_different_interpolation(photo_shard, photo_tiles, resample):
    """The bounds are tight enough to tell bicubic from bilinear or Lanczos resizing (measured:
    mean 0.82 / 0.56 levels, 99.9th percentile 12.9 / 10 levels, vs 0.16 and 1 for bicubic)."""
    assert not within_tolerance(tile_differences(photo_tiles, photo_shard[1], resample))


@pytest.mark.gpu
def test_mixed_gpu_decoding_runs_the_same_graph(photo_shard, photo_tiles):
    """Same graph with device_id=0: tiles on the GPU, same grids, close to InternVL's PIL path.

    nvJPEG's IDCT is not libjpeg-turbo's (about one level apart on some pixels), so the bounds
    are looser than on the CPU: mean < 0.5 level, max <= 24 levels. Not yet run on a GPU.
    """
    (tar, index), encoded = photo_shard
    samples = run_epoch([tar], [index], device_id=0)
    assert all(s.tiles_nchw.is_cuda for s in samples)
    assert [s.grid for s in samples] == [s.grid for s in photo_tiles]
    everything = torch.cat(list(tile_differences(samples, encoded).values()))
    assert everything.mean() < 0.5 * LEVEL and everything.max() <= 24 * LEVEL


def test_jpeg_recompression_is_seeded_and_strength_follows_quality(photo_shard):
    (tar, index), _ = photo_shard
    clean = run_epoch([tar], [index])

    def mean_change(quality, seed=7):
        noisy = run_epoch([tar], [index], jpeg_quality=quality, seed=seed)
        return noisy, torch.stack(
            [(a.tiles_nchw - b.tiles_nchw).abs().mean() for a, b in zip(noisy, clean, strict=True)]
        )

    low, change_75 = mean_change((75, 75))
    _, change_100 = mean_change((100, 100))
    print(f"\nmean |change| q75 {change_75.mean():.4f}, q100 {change_100.mean():.4f}")
    assert (change_75 > change_100).all() and (change_100 > 0).all()
    assert all(a.grid == b.grid for a, b in zip(low, clean, strict=True))
    first, _ = mean_change((75, 100), seed=11)
    again, _ = mean_change((75, 100), seed=11)
    other, _ = mean_change((75, 100), seed=12)
    assert all(torch.equal(a.tiles_nchw, b.tiles_nchw) for a, b in zip(first, again, strict=True))
    assert any(
        not torch.equal(a.tiles_nchw, b.tiles_nchw) for a, b in zip(first, other, strict=True)
    )


def small_shards(root, counts):
    """Shards of small images; returns (paths, index paths, keys in stored order)."""
    rng = np.random.default_rng(0)
    paths, indexes, keys = [], [], []
    for shard, count in enumerate(counts):
        samples = []
        for k in range(count):
            key = f"s{shard}_{k:03d}"
            image = rng.integers(0, 255, (40 + k, 60, 3), dtype=np.uint8)
            samples.append((key, jpeg(image), {"key": key}))
        tar, index = write_shard(root / f"part-{shard:06d}.tar", samples)
        paths.append(tar)
        indexes.append(index)
        keys += [f"{tar}:{key}" for key, _, _ in samples]
    return paths, indexes, keys


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_ranks_read_disjoint_contiguous_slices_every_epoch(tmp_path, num_shards):
    paths, indexes, keys = small_shards(tmp_path, [5, 6])
    cfg = TilingPipelineConfig(batch_size=2, max_num=4)
    seen = []
    for rank in range(num_shards):
        loader = TiledImageLoader(paths, indexes, cfg, shard_id=rank, num_shards=num_shards)
        epochs = [[s.key for batch in loader for s in batch] for _ in range(2)]
        assert epochs[0] == epochs[1]  # a second epoch starts at the slice's start again
        start, end = (len(keys) * rank) // num_shards, (len(keys) * (rank + 1)) // num_shards
        assert epochs[0] == keys[start:end]
        assert all(json.loads(s.meta)["key"] in s.key for batch in loader for s in batch)
        seen += epochs[0]
    assert seen == keys


@pytest.mark.parametrize(
    ("damage", "cause"),
    [
        # Not a JPEG at all: the header parse in peek_image_shape fails; DALI's own message
        # does not name the sample ("nvImageCodec failure: '#4'").
        (lambda good: b"not a jpeg" * 20, "nvImageCodec failure"),
        # A valid header and half the entropy-coded data: the decoder fails and names it.
        (lambda good: good[: len(good) // 2], "Failed to decode sample"),
    ],
)
def test_corrupt_jpeg_fails_its_batch_and_names_candidates(tmp_path, damage, cause):
    good = jpeg(skimage.data.coffee())
    samples = [(f"s{k}", damage(good) if k == 3 else good, {"k": k}) for k in range(6)]
    tar, index = write_shard(tmp_path / "bad-000000.tar", samples)
    loader = TiledImageLoader([tar], [index], TilingPipelineConfig(batch_size=2, max_num=2))
    batches = iter(loader)
    # The batch before the bad sample arrives intact.
    assert [s.key for s in next(batches)] == [f"{tar}:s0", f"{tar}:s1"]
    # The whole batch holding s3 fails: a DALI batch cannot drop one sample.
    with pytest.raises(ShardDecodeError) as failure:
        next(batches)
    message = str(failure.value)
    assert cause in message
    assert f"candidate samples: {tar}:s2, {tar}:s3" in message
    assert "pipeline is now invalid" in message
