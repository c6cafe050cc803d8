"""The DALI image graph the loader's `tiler.ImageTiler` runs: decode as PIL does, InternVL's
bicubic resizes, optional JPEG re-compression; and DALI outputs as torch tensors.

- The decoder (`"mixed"` with a GPU `device_id`, `"cpu"` with `device_id=None`, same graph)
  yields RGB without EXIF rotation (PIL's `Image.open` does not rotate either, and the header
  size must agree with the decoded one). Fancy chroma upsampling is forced: libjpeg, and so PIL,
  use it; nvJPEG does not by default.
- One bicubic, antialiased resize of the whole image to (cols * S, rows * S) and one to S x S for
  the thumbnail.
- Training only: JPEG re-compression with a quality drawn per image, applied to the resized grid
  image and, independently, to the thumbnail. InternVL draws a quality per tile; here all tiles
  of one image share one. S = 448 is a multiple of the 16-pixel JPEG MCU, so blocks never
  straddle tiles.

DALI's resize keeps float intermediates; PIL rounds to uint8 between its horizontal and vertical
passes, so tiles differ from InternVL's PIL path by a few uint8 levels (tests measure it). The
shard-reading DALI pipeline (`fn.readers.webdataset`) that once lived here is a test reference
now (`tests/dali_reader.py`): the loader reads shards itself, for exact resume and bad-sample
skipping.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali.plugin.pytorch import feed_ndarray

from megatron_internvl.data.pixels import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "as_torch", "decode", "distort", "image_graph"]
DataNode = Any  # nvidia.dali.data_node.DataNode; DALI's graph nodes are untyped


def decode(encoded: DataNode, device_id: int | None) -> DataNode:
    """RGB uint8 HWC, as PIL decodes: no EXIF rotation, fancy chroma upsampling."""
    return fn.decoders.image(
        encoded,
        device="cpu" if device_id is None else "mixed",
        output_type=types.RGB,
        adjust_orientation=False,
        jpeg_fancy_upsampling=True,
    )


def distort(image: DataNode, quality: DataNode) -> DataNode:
    """JPEG re-compression (encode + decode) at a per-sample int32 quality."""
    return fn.jpeg_compression_distortion(image, quality=quality)


def image_graph(
    encoded: DataNode,
    width: DataNode,
    height: DataNode,
    image_size: int,
    device_id: int | None,
    quality: DataNode | None = None,
    thumb_quality: DataNode | None = None,
) -> tuple[DataNode, DataNode]:
    """decode -> bicubic resize to (width, height) and to S x S -> optional JPEG re-compression.

    The graph both pipelines share; returns the uint8 HWC grid image and thumbnail, on the GPU
    when `device_id` is set. `thumb_quality` defaults to `quality`.
    """
    image = decode(encoded, device_id)
    size = float(image_size)
    resize_args = {"interp_type": types.INTERP_CUBIC, "antialias": True}
    grid_hwc = fn.resize(image, resize_x=width, resize_y=height, **resize_args)
    thumb_hwc = fn.resize(image, resize_x=size, resize_y=size, **resize_args)
    if quality is not None:
        grid_hwc = distort(grid_hwc, quality)
        thumb_hwc = distort(thumb_hwc, quality if thumb_quality is None else thumb_quality)
    return grid_hwc, thumb_hwc


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


def as_torch(dali_tensor, device: torch.device) -> torch.Tensor:
    """A DALI output as a torch tensor: zero-copy on the CPU (valid until the pipeline's next run),
    a copy on the GPU."""
    if device.type == "cpu":
        return torch.from_numpy(np.asarray(dali_tensor))
    return _to_torch(dali_tensor, device)
