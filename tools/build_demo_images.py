"""Write the demo photographs (scikit-image's bundled photos, resized down, as JPEG) and the
demo clip (a camera pan across the astronaut photo, MPEG-4 Part 2 in .mp4, made with PyAV).

Usage: python tools/build_demo_images.py [--out demo/data/images] [--video-out demo/data/videos]

The photos ship inside the scikit-image wheel (nothing is downloaded). The captions and
questions about them are hand-written in demo/data/demo.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "camera",
    "clock",
    "coins",
    "page",
)
MAX_SIDE = 320


def write_photos(out: Path, max_side: int = MAX_SIDE, quality: int = 85) -> list[Path]:
    """Save each photo as `<name>.jpg` with its longer side at most `max_side` pixels."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        image = Image.fromarray(np.asarray(array)).convert("RGB")
        scale = min(1.0, max_side / max(image.size))
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.LANCZOS)
        path = out / f"{name}.jpg"
        image.save(path, format="JPEG", quality=quality, optimize=True)
        paths.append(path)
    return paths


def write_pan_clip(out: Path, frames: int = 48, size: tuple[int, int] = (128, 96)) -> Path:
    """A 10 fps clip of a window panning left to right across the astronaut photo."""
    import av

    photo = skimage.data.astronaut()  # 512 x 512
    width, height = size
    step = (photo.shape[1] - 2 * width) // frames
    out.mkdir(parents=True, exist_ok=True)
    path = out / "astronaut_pan.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            window = photo[100 : 100 + 2 * height : 2, i * step : i * step + 2 * width : 2]
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(window), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo/data/images"))
    parser.add_argument("--video-out", type=Path, default=Path("demo/data/videos"))
    args = parser.parse_args()
    for path in [*write_photos(args.out), write_pan_clip(args.video_out)]:
        print(f"{path} {path.stat().st_size / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
