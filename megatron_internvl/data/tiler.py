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
- DALI decodes and, on a GPU, runs the rest of `dali_pipeline.image_graph` (the graph the
  webdataset pipeline uses): resize to (cols*S, rows*S) and to S x S, optional JPEG
  re-compression with a quality given per image from the host (so it is reproducible and
  resumable, unlike DALI's own RNG). Tiles are cut on the pipeline's device and returned as
  uint8 HWC (`pixels.normalize_tiles` makes the float model input once per micro-batch).
- on the CPU (`resize="auto"`), DALI only decodes. Then one task per image on `num_threads`
  host threads: the two resizes in torch's uint8 SIMD kernel (`pixels.resize_bicubic`: 2-3x
  faster per core than DALI's CPU resize, within 2 levels of PIL where DALI's is up to ~20
  away), the tile cut, and JPEG re-compression tile by tile (as InternVL's
  `simulate_jpeg_degradation`; the quality is still one per image, as on the GPU) by the
  thread's own DALI `distort` pipeline, all in HWC (no layout copies). Torch, numpy and DALI
  release the GIL, so the threads run in parallel; PIL's JPEG encoder does not (it serialised
  them, measured), and one DALI re-compression run per batch cost a thread barrier (~10%
  throughput, measured). Two decode pipelines take turns, so DALI decodes the next batch while
  the threads work. Only the thumbnails that are kept are computed.
- already decoded images (a video file's frames, uint8 arrays from PyAV) skip DALI: one host
  thread task each (resize, cut, re-compression), also with a GPU (then the tiles move to it).
  Re-encoding them for DALI (PNG) cost more than the rest of their path (measured). A video
  frame is re-compressed before its resize, at its own size, as InternVL's transform does
  (`ImageJob.video_frame`); with a GPU, frame members are decoded by PIL for that order.
- on a DALI decode failure the pipeline is dead: it is rebuilt, and the batch's images are
  retried one at a time, so only the image(s) that fail are reported.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.pipeline import Pipeline
from PIL import Image

from megatron_internvl.data.dali_pipeline import as_torch, decode, distort, image_graph
from megatron_internvl.data.pixels import cut_tiles, tile_image
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
    batch_size: int = 32
    """Images per DALI run: all of a loader fill's images in one run (fewer thread barriers)."""
    num_threads: int = 2
    """DALI's threads, and the host threads resizing and re-compressing on the CPU."""
    device_id: int | None = None
    """CUDA device for decoding and resizing; None runs on the CPU."""
    resize: Literal["auto", "dali", "host"] = "auto"
    """Where resizes and re-compression run: "dali" (`image_graph`, GPU or CPU), "host" (torch's
    uint8 kernel and PIL, CPU only; see the module), "auto": "dali" with a GPU, else "host"."""


@dataclass(frozen=True)
class ImageJob:
    """One image to tile: encoded bytes (decoded by DALI) or an already decoded uint8
    [H, W, 3] RGB array (a video frame), its tile cap and (if re-compressing) its JPEG quality."""

    data: bytes | np.ndarray
    max_num: int
    quality: int = 100
    video_frame: bool = False
    """Re-compressed at its own size before the resize, as InternVL's transform treats a video
    frame (JPEG, then Resize to S x S); an image's tiles are re-compressed after the cut (its
    transform runs on the tiles)."""


class ImageDecodeError(ValueError):
    """An image failed to decode; `index` is its position in the `tile` call."""

    def __init__(self, index: int, detail: str) -> None:
        super().__init__(detail)
        self.index = index


def _resize_in_dali(cfg: TilerConfig) -> bool:
    if cfg.resize == "auto":
        return cfg.device_id is not None
    if cfg.resize == "host" and cfg.device_id is not None:
        raise ValueError("tiler: resize='host' runs on the CPU; use 'dali' or 'auto' with a GPU")
    if cfg.resize not in ("dali", "host"):
        raise ValueError(f"tiler: resize={cfg.resize!r}; use 'auto', 'dali' or 'host'")
    return cfg.resize == "dali"


def _graph(cfg: TilerConfig):
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    if not _resize_in_dali(cfg):
        return decode(encoded, cfg.device_id)
    # Resize targets in pixels, (cols * S, rows * S), per image.
    width = fn.external_source(name="width", dtype=types.FLOAT, ndim=0)
    height = fn.external_source(name="height", dtype=types.FLOAT, ndim=0)
    quality = None
    if cfg.jpeg_quality is not None:
        quality = fn.external_source(name="quality", dtype=types.INT32, ndim=0)
    return image_graph(encoded, width, height, cfg.image_size, cfg.device_id, quality)


def _distort_graph():
    # no_copy: the fed arrays outlive the synchronous run, so DALI need not copy (under the GIL).
    image = fn.external_source(name="image", dtype=types.UINT8, ndim=3, layout="HWC", no_copy=True)
    return distort(image, fn.external_source(name="quality", dtype=types.INT32, ndim=0))


def build_tiler_pipeline(cfg: TilerConfig) -> Pipeline:
    """A built DALI pipeline fed through `feed_input` ("encoded", and when it resizes "width",
    "height", "quality")."""
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
    """Turns encoded images into `tiles_u8` [tiles, S, S, 3] uint8 with DALI (see the module)."""

    def __init__(self, cfg: TilerConfig) -> None:
        self.cfg = cfg
        self.device = torch.device("cpu" if cfg.device_id is None else f"cuda:{cfg.device_id}")
        self.resize_in_dali = _resize_in_dali(cfg)
        self.rebuilds = 0
        # Host resizing: two pipelines take turns, so DALI decodes batch k+1 while the host
        # threads work on batch k (whose zero-copy outputs stay valid until its pipeline reruns).
        count = 1 if self.resize_in_dali else 2
        self.pipes = [build_tiler_pipeline(cfg) for _ in range(count)]
        self._inflight: list[list[Future]] = [[] for _ in range(count)]
        self._local = threading.local()  # per host thread: its re-compression pipeline
        # Host threads: every resize on the CPU, and decoded frames with a GPU too.
        self._pool = ThreadPoolExecutor(cfg.num_threads, thread_name_prefix="tiler")

    def close(self) -> None:
        """Stop the host threads and release the DALI pipelines now, not at interpreter exit
        (DALI's worker threads torn down during finalisation can abort the process)."""
        self._pool.shutdown(wait=True)
        self.pipes.clear()
        self._inflight = [[] for _ in self._inflight]

    def grid(self, data: bytes | np.ndarray, max_num: int) -> Grid:
        """The InternVL grid of one image (encoded: from its header) under a tile cap."""
        if isinstance(data, np.ndarray):
            if data.ndim != 3 or data.shape[2] != 3 or data.dtype != np.uint8:
                raise ValueError(f"a decoded image must be uint8 [H, W, 3], not {data.shape}")
            height, width = data.shape[:2]
        else:
            width, height = header_size(data)
        return choose_grid(width, height, self.cfg.min_num, max_num, self.cfg.image_size)

    def tile(self, jobs: Sequence[ImageJob]) -> list[torch.Tensor | ImageDecodeError]:
        """tiles_u8 per job, or the `ImageDecodeError` of a job whose image is bad."""
        results: list = []
        step = self.cfg.batch_size
        for k, start in enumerate(range(0, len(jobs), step)):
            results += self._tile_batch(jobs[start : start + step], start, k % len(self.pipes))
        for inflight in self._inflight:
            inflight.clear()
        return [r.result() if isinstance(r, Future) else r for r in results]

    def _tile_batch(self, jobs: Sequence[ImageJob], offset: int, pipe: int) -> list:
        grids: list[Grid | ImageDecodeError] = []
        for i, job in enumerate(jobs):
            try:
                grids.append(self.grid(job.data, job.max_num))
            except Exception as error:  # PIL raises many types for bad headers
                grids.append(ImageDecodeError(offset + i, f"unreadable image header: {error}"))
        results: list = list(grids)
        good = []
        for i, grid in enumerate(grids):
            if isinstance(grid, ImageDecodeError):
                continue
            if isinstance(jobs[i].data, np.ndarray):  # decoded: straight to a host thread
                results[i] = self._submit(jobs[i].data, grid, jobs[i])
            elif jobs[i].video_frame and self.resize_in_dali:
                # DALI's graph compresses after its resize: a frame member is decoded here.
                with Image.open(io.BytesIO(jobs[i].data)) as image:
                    results[i] = self._submit(np.asarray(image.convert("RGB")), grid, jobs[i])
            else:
                good.append(i)
        if not good:
            return results
        try:
            outputs = self._run(pipe, [jobs[i] for i in good], [grids[i] for i in good])
        except RuntimeError:
            # The pipeline is invalid after a failure; retry one image at a time so that only
            # the bad one(s) are dropped.
            outputs = []
            for i in good:
                self._rebuild(pipe)
                try:
                    (out,) = self._run(pipe, [jobs[i]], [grids[i]])
                    outputs.append(out.result() if isinstance(out, Future) else out)
                except RuntimeError as error:
                    cause = str(error).split("encountered:", 1)[-1].strip().splitlines()
                    outputs.append(ImageDecodeError(offset + i, cause[0] if cause else str(error)))
            self._rebuild(pipe)
        for i, out in zip(good, outputs, strict=True):
            results[i] = out
        return results

    def _rebuild(self, pipe: int) -> None:
        self.rebuilds += 1
        self.pipes[pipe] = build_tiler_pipeline(self.cfg)

    def _distort_tiles(self, tiles_u8: np.ndarray, quality: int) -> None:
        """JPEG re-compression of each tile (or of a frame: a batch of one), in place, by this
        host thread's own DALI pipeline: one run per image, inside the image's task (no batch
        barrier), and DALI releases the GIL while it encodes (PIL's JPEG encoder holds it:
        measured, it serialised the threads).
        """
        pipe = getattr(self._local, "distort", None)
        if pipe is None:
            pipe = self._local.distort = pipeline_def(_distort_graph)(
                batch_size=self.cfg.max_num + 1,
                num_threads=1,
                device_id=None,
                prefetch_queue_depth=1,
                exec_async=False,
                exec_pipelined=False,
            )
            pipe.build()
        step = self.cfg.max_num + 1  # a whole image at the loader's caps; a job may ask for more
        for start in range(0, len(tiles_u8), step):
            chunk = tiles_u8[start : start + step]
            pipe.feed_input("image", list(chunk))
            pipe.feed_input("quality", [np.asarray(quality, dtype=np.int32)] * len(chunk))
            (distorted,) = pipe.run()
            for tile, out in zip(chunk, distorted, strict=True):
                tile[...] = np.asarray(out)

    def _thumb(self, grid: Grid) -> bool:
        return self.cfg.use_thumbnail and grid[0] * grid[1] > 1

    def _run(self, pipe: int, jobs: Sequence[ImageJob], grids: Sequence[Grid]) -> list:
        """tiles_u8 per image (as futures when resizing on the host)."""
        for future in self._inflight[pipe]:  # they read this pipeline's outputs
            future.result()
        dali = self.pipes[pipe]
        dali.feed_input("encoded", [np.frombuffer(j.data, dtype=np.uint8) for j in jobs])
        if not self.resize_in_dali:
            futures = self._resize_on_host(dali.run()[0], jobs, grids)
            self._inflight[pipe] = futures
            return futures
        size = self.cfg.image_size
        dali.feed_input("width", [np.float32(c * size) for c, _ in grids])
        dali.feed_input("height", [np.float32(r * size) for _, r in grids])
        if self.cfg.jpeg_quality is not None:
            dali.feed_input("quality", [np.asarray(j.quality, dtype=np.int32) for j in jobs])
        grid_hwc, thumb_hwc = dali.run()
        out = []
        for i, grid in enumerate(grids):
            thumb = as_torch(thumb_hwc[i], self.device) if self._thumb(grid) else None
            out.append(cut_tiles(as_torch(grid_hwc[i], self.device), thumb, grid, size))
        return out

    def _tile_on_host(self, image_hwc: np.ndarray, grid: Grid, job: ImageJob) -> torch.Tensor:
        """tiles_u8 of a decoded image: resizes, tile cut and re-compression on this thread."""
        jpeg = self.cfg.jpeg_quality is not None
        if jpeg and job.video_frame:
            image_hwc = image_hwc.copy()  # not the decoder's buffer
            self._distort_tiles(image_hwc[None], job.quality)
        tiles_u8 = tile_image(
            torch.from_numpy(image_hwc), grid, self.cfg.image_size, self._thumb(grid)
        )
        if jpeg and not job.video_frame:
            self._distort_tiles(tiles_u8.numpy(), job.quality)
        return tiles_u8 if self.device.type == "cpu" else tiles_u8.to(self.device)

    def _submit(self, image_hwc: np.ndarray, grid: Grid, job: ImageJob) -> Future:
        return self._pool.submit(self._tile_on_host, image_hwc, grid, job)

    def _resize_on_host(
        self, decoded, jobs: Sequence[ImageJob], grids: Sequence[Grid]
    ) -> list[Future]:
        # One task per image, largest grids first: the threads then finish together (the last
        # task is a short one). The arrays are zero-copy views of DALI's outputs: used before
        # the pipeline runs again (`_inflight`).
        order = sorted(range(len(grids)), key=lambda i: -grids[i][0] * grids[i][1])
        futures: list = [None] * len(grids)
        for i in order:
            futures[i] = self._submit(np.asarray(decoded[i]), grids[i], jobs[i])
        return futures
