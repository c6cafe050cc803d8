"""A test reference: DALI's own WebDataset reader feeding the package's image graph
(`dali_pipeline.image_graph`), with InternVL's grid choice unrolled into DALI arithmetic.

It checks that our shards read with DALI's `fn.readers.webdataset` and index files, and that the
host-fed `ImageTiler` gives the same tiles. Design notes:

- `fn.peek_image_shape` reads the size from the encoded header, and the InternVL grid choice
  (`tiling.choose_grid`) is unrolled into DALI float64 arithmetic over the static candidate list,
  in the same order and with the same tie rule (bit-identical to the Python choice).
- uint8 HWC leaves DALI; tiles are cut (`pixels.cut_tiles`, row-major, thumbnail last) and
  normalised (`pixels.normalize_tiles`): `tiles_nchw` [N, 3, S, S] float32.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.pipeline import Pipeline

from megatron_internvl.data.dali_pipeline import _to_torch, as_torch, image_graph
from megatron_internvl.data.pixels import cut_tiles, normalize_tiles
from megatron_internvl.data.shard_index import split_member
from megatron_internvl.data.tiling import Grid, candidate_grids

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
    size = float(cfg.image_size)
    quality = thumb_quality = None
    if cfg.jpeg_quality is not None:
        low, high = cfg.jpeg_quality
        qualities = [float(q) for q in range(low, high + 1)]
        quality = fn.cast(fn.random.uniform(values=qualities), dtype=types.INT32)
        thumb_quality = fn.cast(fn.random.uniform(values=qualities), dtype=types.INT32)
    grid_hwc, thumb_hwc = image_graph(
        encoded,
        fn.cast(cols * size, dtype=types.FLOAT),
        fn.cast(rows * size, dtype=types.FLOAT),
        cfg.image_size,
        cfg.device_id,
        quality,
        thumb_quality,
    )
    grid_cr = fn.cast(fn.stack(cols, rows), dtype=types.INT32)
    return grid_cr, grid_hwc, thumb_hwc, meta, source_info


def build_tiling_pipeline(
    paths: Sequence[str],
    index_paths: Sequence[str],
    cfg: TilingPipelineConfig,
    shard_id: int = 0,
    num_shards: int = 1,
) -> Pipeline:
    """Build the DALI pipeline, ready to run; `shard_id`/`num_shards`: data-parallel rank/size.

    Outputs per sample: grid (cols, rows) int32, the uint8 grid image [rows*S, cols*S, 3], the
    uint8 thumbnail [S, S, 3], the metadata bytes and the source info bytes.
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


@dataclass
class TiledSample:
    """One image sample after the pipeline."""

    key: str
    """Where it came from: `<shard path>:<member name without extension>`."""
    meta: bytes
    grid: Grid
    tiles_nchw: torch.Tensor
    """[num_tiles, 3, S, S] float32, row-major tiles then the thumbnail (if any)."""


def _member_stem(member: str) -> str:
    return split_member(member)[0]


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
                grid_cr, grid_hwc, thumb_hwc, meta, info = self.pipe.run()
            except RuntimeError as error:
                raise ShardDecodeError(self._describe_failure(done, error)) from error
            take = min(self.shard_size - done, self.cfg.batch_size)
            batch = []
            for i in range(take):
                cols, rows = (int(v) for v in np.asarray(grid_cr[i]))
                thumb = self.cfg.use_thumbnail and cols * rows > 1
                thumb_u8 = as_torch(thumb_hwc[i], self.device) if thumb else None
                grid_u8 = as_torch(grid_hwc[i], self.device)
                tiles_u8 = cut_tiles(grid_u8, thumb_u8, (cols, rows), self.cfg.image_size)
                batch.append(
                    TiledSample(
                        key=_key_from_source_info(_as_bytes(info[i])),
                        meta=_as_bytes(meta[i]),
                        grid=(cols, rows),
                        tiles_nchw=normalize_tiles([tiles_u8]),
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
