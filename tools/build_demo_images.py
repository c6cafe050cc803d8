"""Write the demo photographs: scikit-image's bundled photos, resized down, as JPEG.

Usage: python tools/build_demo_images.py [--out demo/data/images]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo/data/images"))
    args = parser.parse_args()
    for path in write_photos(args.out):
        print(f"{path} {path.stat().st_size / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
