"""DALI pipeline: WebDataset shards -> decoded, tiled, normalised images (`tiles_nchw`).

Design (DALI graphs are static, tile counts are not):

1. `fn.readers.webdataset` reads one image (`image_ext`) and one metadata blob (`meta_ext`) per
   sample, sharded over data-parallel ranks with `shard_id` / `num_shards` and index files
   (`write_index`); `source_info` ("tar:offset:name") gives the sample key for error messages.
2. `fn.peek_image_shape` reads the size from the encoded header, and the InternVL grid choice
   (`tiling.choose_grid`) is unrolled into DALI float64 arithmetic over the static candidate
   list, in the same order and with the same tie rule. float64 division, subtraction and abs are
   correctly rounded in both Python and DALI, so the choice is bit-identical to the Python one
   (the DALI test checks this on many sizes). This avoids `fn.python_function`, which holds the
   GIL and does not work with pipelined / multi-process execution.
3. The decoder (`"mixed"` with a GPU `device_id`, `"cpu"` with `device_id=None`, same graph)
   yields RGB without EXIF rotation (PIL's `Image.open` does not rotate either, and the peeked
   shape must agree with the decoded one). Fancy chroma upsampling is forced: libjpeg, and so
   PIL, use it; nvJPEG does not by default.
4. One bicubic, antialiased resize of the whole image to (cols * S, rows * S) and one to S x S
   for the thumbnail (computed for every sample; dropped on the host for 1-tile images, since a
   DALI batch cannot change its output count per sample).
5. Training only: JPEG re-compression with a quality drawn uniformly from 75..100, applied to the
   resized grid image and, independently, to the thumbnail. InternVL draws a quality per tile;
   here all tiles of one image share one. S = 448 is a multiple of the 16-pixel JPEG MCU, so
   blocks never straddle tiles, and compressing the grid image equals compressing its tiles
   apart from chroma upsampling at tile edges.
6. `crop_mirror_normalize` to float CHW with ImageNet mean/std; tiles are then cut on the host
   (`split_tiles`) by a reshape, row-major, thumbnail last: `tiles_nchw` [N, 3, S, S].

DALI's resize keeps float intermediates; PIL rounds to uint8 between its horizontal and vertical
passes, so tiles differ from InternVL's PIL path by a few uint8 levels (the DALI test measures it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray

from megatron_internvl.data.tiling import Grid, candidate_grids

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
READER_NAME = "shards"


@dataclass(frozen=True)
class TilingPipelineConfig:
    """What the pipeline reads and how it tiles; the DALI runtime knobs live here too."""

    image_size: int = 448
    min_num: int = 1
    max_num: int = 12
    use_thumbnail: bool = True
    jpeg_quality: tuple[int, int] | None = None
    """Inclusive quality range for random JPEG re-compression, e.g. (75, 100); None: off."""
    image_ext: str = "jpg"
    meta_ext: str = "json"
    batch_size: int = 4
    num_threads: int = 2
    device_id: int | None = None
    """CUDA device for decoding and resizing; None runs the same graph on the CPU."""
    seed: int = 1234
    random_shuffle: bool = False
    initial_fill: int = 256
    prefetch_queue_depth: int = 2


def write_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
    """Write the DALI index file of one WebDataset shard (offsets, so readers can seek)."""
    from wds2idx import IndexCreator  # ships with nvidia-dali

    with IndexCreator(str(tar_path), str(idx_path), verbose=False) as creator:
        creator.create_index()


def _grid_in_dali(width, height, cfg: TilingPipelineConfig):
    """`tiling.choose_grid` unrolled into DALI float64 arithmetic; returns (cols, rows) nodes."""

    def f64(value: float):
        return types.Constant(value, dtype=types.FLOAT64)

    aspect_ratio = width / height
    area = width * height
    grids = candidate_grids(cfg.min_num, cfg.max_num)
    first = grids[0]
    # The first candidate always beats the initial +inf; starting from it avoids inf * 0 = nan.
    best_diff = abs(aspect_ratio - f64(first[0] / first[1]))
    cols = f64(first[0]) + best_diff * 0.0  # broadcast the constant to a per-sample value
    rows = f64(first[1]) + best_diff * 0.0
    half_tile_area = 0.5 * cfg.image_size * cfg.image_size
    for i, j in grids[1:]:
        diff = abs(aspect_ratio - f64(i / j))
        take = (diff < best_diff) | ((diff == best_diff) & (area > f64(half_tile_area * i * j)))
        keep = f64(1.0) - take
        # take is 0/1, so these selects are exact in float64.
        best_diff = take * diff + keep * best_diff
        cols = take * f64(i) + keep * cols
        rows = take * f64(j) + keep * rows
    return cols, rows


def _tiling_graph(paths, index_paths, shard_id, num_shards, cfg: TilingPipelineConfig):
    encoded, meta = fn.readers.webdataset(
        paths=list(paths),
        index_paths=list(index_paths),
        ext=[cfg.image_ext, cfg.meta_ext],
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=cfg.random_shuffle,
        initial_fill=cfg.initial_fill,
        missing_component_behavior="error",
        # A rank reads the same slice every epoch (DALI otherwise rotates slices between ranks,
        # so a rank's epoch length would change), and each epoch ends on a batch boundary (the
        # last sample repeated; the loader drops the repeats) so the next starts cleanly.
        stick_to_shard=True,
        pad_last_batch=True,
        name=READER_NAME,
    )
    source_info = fn.get_property(encoded, key="source_info")
    shape_hwc = fn.peek_image_shape(encoded, adjust_orientation=False, dtype=types.INT64)
    height = fn.cast(shape_hwc[0], dtype=types.FLOAT64)
    width = fn.cast(shape_hwc[1], dtype=types.FLOAT64)
    cols, rows = _grid_in_dali(width, height, cfg)

    decoder_device = "cpu" if cfg.device_id is None else "mixed"
    image = fn.decoders.image(
        encoded,
        device=decoder_device,
        output_type=types.RGB,
        adjust_orientation=False,
        jpeg_fancy_upsampling=True,
    )
    size = float(cfg.image_size)
    resize_args = {"interp_type": types.INTERP_CUBIC, "antialias": True}
    grid_hwc = fn.resize(
        image,
        resize_x=fn.cast(cols * size, dtype=types.FLOAT),
        resize_y=fn.cast(rows * size, dtype=types.FLOAT),
        **resize_args,
    )
    thumb_hwc = fn.resize(image, resize_x=size, resize_y=size, **resize_args)
    if cfg.jpeg_quality is not None:
        low, high = cfg.jpeg_quality
        qualities = [float(q) for q in range(low, high + 1)]
        for_grid = fn.cast(fn.random.uniform(values=qualities), dtype=types.INT32)
        for_thumb = fn.cast(fn.random.uniform(values=qualities), dtype=types.INT32)
        grid_hwc = fn.jpeg_compression_distortion(grid_hwc, quality=for_grid)
        thumb_hwc = fn.jpeg_compression_distortion(thumb_hwc, quality=for_thumb)
    normalize_args = {
        "dtype": types.FLOAT,
        "output_layout": "CHW",
        "mean": [255.0 * m for m in IMAGENET_MEAN],
        "std": [255.0 * s for s in IMAGENET_STD],
    }
    grid_chw = fn.crop_mirror_normalize(grid_hwc, **normalize_args)
    thumb_chw = fn.crop_mirror_normalize(thumb_hwc, **normalize_args)
    grid_cr = fn.cast(fn.stack(cols, rows), dtype=types.INT32)
    return grid_cr, grid_chw, thumb_chw, meta, source_info


def build_tiling_pipeline(
    paths: Sequence[str],
    index_paths: Sequence[str],
    cfg: TilingPipelineConfig,
    shard_id: int = 0,
    num_shards: int = 1,
) -> Pipeline:
    """Build the DALI pipeline, ready to run; `shard_id`/`num_shards`: data-parallel rank/size.

    Outputs per sample: grid (cols, rows) int32, the normalised grid image [3, rows*S, cols*S],
    the normalised thumbnail [3, S, S], the metadata bytes and the source info bytes.
    """
    if len(paths) != len(index_paths):
        raise ValueError(
            f"dali pipeline: {len(paths)} shard paths but {len(index_paths)} index paths; "
            "give one index per shard (see write_index)"
        )
    pipe_fn = pipeline_def(_tiling_graph)
    pipe = pipe_fn(
        paths,
        index_paths,
        shard_id,
        num_shards,
        cfg,
        batch_size=cfg.batch_size,
        num_threads=cfg.num_threads,
        device_id=cfg.device_id,
        seed=cfg.seed,
        prefetch_queue_depth=cfg.prefetch_queue_depth,
    )
    pipe.build()
    return pipe


def split_tiles(grid_chw: torch.Tensor, grid: Grid, image_size: int) -> torch.Tensor:
    """Cut a [3, rows*S, cols*S] image into row-major tiles_nchw [rows*cols, 3, S, S]."""
    cols, rows = grid
    channels = grid_chw.shape[0]
    expected = (channels, rows * image_size, cols * image_size)
    if tuple(grid_chw.shape) != expected:
        raise ValueError(f"split_tiles: image shape {tuple(grid_chw.shape)} != {expected}")
    tiles_rcchw = grid_chw.reshape(channels, rows, image_size, cols, image_size).permute(
        1, 3, 0, 2, 4
    )
    return tiles_rcchw.reshape(rows * cols, channels, image_size, image_size)


@dataclass
class TiledSample:
    """One image sample after the pipeline."""

    key: str
    """Where it came from: `<shard path>:<member name without extension>`."""
    meta: bytes
    grid: Grid
    tiles_nchw: torch.Tensor
    """[num_tiles, 3, S, S] float32, row-major tiles then the thumbnail (if any)."""


def _to_torch(dali_tensor, device: torch.device) -> torch.Tensor:
    # feed_ndarray copies, so the result outlives DALI's reused output buffers.
    dtype = {
        types.FLOAT: torch.float32,
        types.INT32: torch.int32,
        types.UINT8: torch.uint8,
    }[dali_tensor.dtype]
    out = torch.empty(tuple(dali_tensor.shape()), dtype=dtype, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    return feed_ndarray(dali_tensor, out, cuda_stream=stream)


def _member_stem(member: str) -> str:
    # WebDataset: the extension starts at the first dot of the file name (not of its folder).
    slash = member.rfind("/") + 1
    dot = member.find(".", slash)
    return member if dot < 0 else member[:dot]


def _key_from_source_info(info: bytes) -> str:
    path, _offset, member = info.decode().rsplit(":", 2)
    return f"{path}:{_member_stem(member)}"


class ShardDecodeError(RuntimeError):
    """DALI failed on a batch; the pipeline is dead and must be rebuilt without the bad sample."""


class TiledImageLoader:
    """One epoch of this rank's share of the shards, as batches of `TiledSample`s.

    A corrupt image fails the whole DALI batch (a batch cannot drop a sample) and leaves the
    pipeline invalid; the loader re-raises it as `ShardDecodeError` naming the batch's
    candidate sample keys (read from the index files when not shuffling). Validate shards
    before training rather than relying on this.
    """

    def __init__(
        self,
        paths: Sequence[str],
        index_paths: Sequence[str],
        cfg: TilingPipelineConfig,
        shard_id: int = 0,
        num_shards: int = 1,
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.index_paths = [str(p) for p in index_paths]
        self.cfg = cfg
        self.pipe = build_tiling_pipeline(self.paths, self.index_paths, cfg, shard_id, num_shards)
        self.device = torch.device("cpu" if cfg.device_id is None else f"cuda:{cfg.device_id}")
        meta = self.pipe.reader_meta(READER_NAME)
        total = meta["epoch_size"]
        # The reader's own split: shard k holds samples [k*N//n, (k+1)*N//n) of all shards.
        self.shard_start = (total * shard_id) // num_shards
        self.shard_size = (total * (shard_id + 1)) // num_shards - self.shard_start

    def __len__(self) -> int:
        """Batches per epoch for this rank (the last may be partial)."""
        return -(-self.shard_size // self.cfg.batch_size)

    def __iter__(self) -> Iterator[list[TiledSample]]:
        done = 0
        while done < self.shard_size:
            try:
                grid_cr, grid_chw, thumb_chw, meta, info = self.pipe.run()
            except RuntimeError as error:
                raise ShardDecodeError(self._describe_failure(done, error)) from error
            take = min(self.shard_size - done, self.cfg.batch_size)
            batch = []
            for i in range(take):
                cols, rows = (int(v) for v in _to_torch(grid_cr[i], torch.device("cpu")))
                tiles_nchw = split_tiles(
                    _to_torch(grid_chw[i], self.device), (cols, rows), self.cfg.image_size
                )
                if self.cfg.use_thumbnail and cols * rows > 1:
                    thumb_nchw = _to_torch(thumb_chw[i], self.device).unsqueeze(0)
                    tiles_nchw = torch.cat([tiles_nchw, thumb_nchw])
                batch.append(
                    TiledSample(
                        key=_key_from_source_info(_as_bytes(info[i])),
                        meta=_as_bytes(meta[i]),
                        grid=(cols, rows),
                        tiles_nchw=tiles_nchw,
                    )
                )
            done += take
            yield batch

    def _describe_failure(self, done: int, error: RuntimeError) -> str:
        # DALI's message: operator, graph traceback, then "encountered:" and the cause.
        cause = str(error).split("encountered:", 1)[-1].strip().splitlines()
        where = f"DALI failed on the batch after {done} sample(s) of this rank's share"
        if self.cfg.random_shuffle:
            candidates = "unknown (random_shuffle=True)"
        else:
            keys = self._keys_in_order()
            start = self.shard_start + done
            candidates = ", ".join(keys[start : start + self.cfg.batch_size])
        return (
            f"{where}: {cause[0] if cause else error}; candidate samples: {candidates}. A DALI "
            "batch cannot skip a sample and the pipeline is now invalid: remove or re-encode the "
            "bad sample (validate the shards) and build a new loader"
        )

    def _keys_in_order(self) -> list[str]:
        keys = []
        for path, index_path in zip(self.paths, self.index_paths, strict=True):
            with open(index_path) as index:
                next(index)  # "v1.2 <num_samples>"
                for line in index:
                    fields = line.split()
                    if fields:  # components are (ext, offset, size, name) quadruples
                        keys.append(f"{path}:{_member_stem(fields[3])}")
        return keys


def _as_bytes(dali_tensor) -> bytes:
    return _to_torch(dali_tensor, torch.device("cpu")).numpy().tobytes()
