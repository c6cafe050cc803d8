"""DALI decode + tiling of images handed over from Python (any number of images per sample).

`TiledImageLoader` lets DALI's webdataset reader pick the samples: one image per sample, and a
failed decode loses the whole batch. The loader needs more: 0..n images per sample with a
per-image tile cap that depends on n, exact resume positions, and skipping exactly the bad
sample. So here Python reads the encoded bytes (cheap: a seek and a read per member, see
`shards.ShardReader`) and DALI does the expensive part, in its threads:

- the grid is chosen in Python with `tiling.choose_grid` from the size in the image header
  (PIL reads only the header), with the image's own cap. The candidate order for caps 4..7 is
  not a prefix of the order for 12 (measured), so one unrolled DALI graph could not serve every
  cap; computing it on the host is exact by construction.
- DALI decodes (RGB, no EXIF rotation, fancy upsampling: as `dali_pipeline`), resizes the whole
  image to (cols*S, rows*S) and to S x S (thumbnail), optionally re-compresses both with a
  JPEG quality given per image from the host (so it is reproducible and resumable, unlike
  DALI's own RNG), and normalises with ImageNet mean/std; tiles are cut on the host.
- on a DALI failure the pipeline is dead: it is rebuilt, and the batch's images are retried
  one at a time, so only the image(s) that fail are reported.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.pipeline import Pipeline
from PIL import Image

from megatron_internvl.data.dali_pipeline import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _to_torch,
)
from megatron_internvl.data.tiling import Grid, choose_grid


@dataclass(frozen=True)
class TilerConfig:
    """How images become tiles, and the DALI runtime knobs."""

    image_size: int = 448
    min_num: int = 1
    max_num: int = 12
    """Tile cap of a single image; n images get max(1, max_num // n) each."""
    use_thumbnail: bool = True
    jpeg_quality: tuple[int, int] | None = None
    """Inclusive quality range for random JPEG re-compression, e.g. (75, 100); None: off."""
    batch_size: int = 8
    """Images per DALI run."""
    num_threads: int = 2
    device_id: int | None = None
    """CUDA device for decoding and resizing; None runs the same graph on the CPU."""


@dataclass(frozen=True)
class ImageJob:
    """One image to tile: encoded bytes, its tile cap and (if re-compressing) its JPEG quality."""

    data: bytes
    max_num: int
    quality: int = 100


class ImageDecodeError(ValueError):
    """An image failed to decode; `index` is its position in the `tile` call."""

    def __init__(self, index: int, detail: str) -> None:
        super().__init__(detail)
        self.index = index


def _graph(cfg: TilerConfig):
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    # Resize targets in pixels, (cols * S, rows * S), per image.
    width = fn.external_source(name="width", dtype=types.FLOAT, ndim=0)
    height = fn.external_source(name="height", dtype=types.FLOAT, ndim=0)
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
    grid_hwc = fn.resize(image, resize_x=width, resize_y=height, **resize_args)
    thumb_hwc = fn.resize(image, resize_x=size, resize_y=size, **resize_args)
    if cfg.jpeg_quality is not None:
        quality = fn.external_source(name="quality", dtype=types.INT32, ndim=0)
        grid_hwc = fn.jpeg_compression_distortion(grid_hwc, quality=quality)
        thumb_hwc = fn.jpeg_compression_distortion(thumb_hwc, quality=quality)
    normalize_args = {
        "dtype": types.FLOAT,
        "output_layout": "CHW",
        "mean": [255.0 * m for m in IMAGENET_MEAN],
        "std": [255.0 * s for s in IMAGENET_STD],
    }
    return (
        fn.crop_mirror_normalize(grid_hwc, **normalize_args),
        fn.crop_mirror_normalize(thumb_hwc, **normalize_args),
    )


def build_tiler_pipeline(cfg: TilerConfig) -> Pipeline:
    """A built DALI pipeline fed through `feed_input` ("encoded", "width", "height", "quality")."""
    pipe = pipeline_def(_graph)(
        cfg,
        batch_size=cfg.batch_size,
        num_threads=cfg.num_threads,
        device_id=cfg.device_id,
        # Fed synchronously, one run per feed: no prefetching across feeds.
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
    )
    pipe.build()
    return pipe


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the encoded header (PIL reads no pixel data here)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size


class ImageTiler:
    """Turns encoded images into `tiles_nchw` [tiles, 3, S, S] float32 with DALI."""

    def __init__(self, cfg: TilerConfig) -> None:
        self.cfg = cfg
        self.device = torch.device("cpu" if cfg.device_id is None else f"cuda:{cfg.device_id}")
        self.pipe = build_tiler_pipeline(cfg)
        self.rebuilds = 0

    def grid(self, data: bytes, max_num: int) -> Grid:
        """The InternVL grid of one encoded image under a tile cap."""
        width, height = header_size(data)
        return choose_grid(width, height, self.cfg.min_num, max_num, self.cfg.image_size)

    def tile(self, jobs: Sequence[ImageJob]) -> list[torch.Tensor | ImageDecodeError]:
        """tiles_nchw per job, or the `ImageDecodeError` of a job whose image is bad."""
        results: list[torch.Tensor | ImageDecodeError] = []
        step = self.cfg.batch_size
        for start in range(0, len(jobs), step):
            results += self._tile_batch(jobs[start : start + step], start)
        return results

    def _tile_batch(self, jobs: Sequence[ImageJob], offset: int) -> list:
        grids: list[Grid | ImageDecodeError] = []
        for i, job in enumerate(jobs):
            try:
                grids.append(self.grid(job.data, job.max_num))
            except Exception as error:  # PIL raises many types for bad headers
                grids.append(ImageDecodeError(offset + i, f"unreadable image header: {error}"))
        good = [i for i, g in enumerate(grids) if not isinstance(g, ImageDecodeError)]
        results: list = list(grids)
        if not good:
            return results
        try:
            outputs = self._run([jobs[i] for i in good], [grids[i] for i in good])
        except RuntimeError:
            # The pipeline is invalid after a failure; retry one image at a time so that only
            # the bad one(s) are dropped.
            outputs = []
            for i in good:
                self._rebuild()
                try:
                    outputs += self._run([jobs[i]], [grids[i]])
                except RuntimeError as error:
                    cause = str(error).split("encountered:", 1)[-1].strip().splitlines()
                    outputs.append(ImageDecodeError(offset + i, cause[0] if cause else str(error)))
            self._rebuild()
        for i, out in zip(good, outputs, strict=True):
            results[i] = out
        return results

    def _rebuild(self) -> None:
        self.rebuilds += 1
        self.pipe = build_tiler_pipeline(self.cfg)

    def _run(self, jobs: Sequence[ImageJob], grids: Sequence[Grid]) -> list[torch.Tensor]:
        self.pipe.feed_input("encoded", [np.frombuffer(j.data, dtype=np.uint8) for j in jobs])
        size = self.cfg.image_size
        self.pipe.feed_input("width", [np.float32(c * size) for c, _ in grids])
        self.pipe.feed_input("height", [np.float32(r * size) for _, r in grids])
        if self.cfg.jpeg_quality is not None:
            self.pipe.feed_input("quality", [np.asarray(j.quality, dtype=np.int32) for j in jobs])
        grid_chw, thumb_chw = self.pipe.run()
        size = self.cfg.image_size
        out = []
        for i, (cols, rows) in enumerate(grids):
            thumb = self.cfg.use_thumbnail and cols * rows > 1
            # One copy per tile, straight into the result: a tile-major view of the grid image
            # (DALI's buffers are reused by the next run, so a copy is needed anyway).
            tiles_nchw = torch.empty(
                (cols * rows + thumb, 3, size, size), dtype=torch.float32, device=self.device
            )
            grid_view = self._view(grid_chw[i]).view(3, rows, size, cols, size)
            tiles_nchw[: cols * rows].view(rows, cols, 3, size, size).copy_(
                grid_view.permute(1, 3, 0, 2, 4)
            )
            if thumb:
                tiles_nchw[-1].copy_(self._view(thumb_chw[i]))
            out.append(tiles_nchw)
        return out

    def _view(self, dali_tensor) -> torch.Tensor:
        if self.device.type == "cpu":  # zero-copy; valid until the next run
            return torch.from_numpy(np.asarray(dali_tensor))
        return _to_torch(dali_tensor, self.device)
