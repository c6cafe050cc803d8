"""Data throughput: our loader (DALI tiling + chat tokens + packing) vs InternVL's own path.

Usage: python benchmarks/data_throughput.py [--samples 160] [--shards DIR] [--tokenizer DIR]

Both read the same shards in the same run. Without --shards, shards of scikit-image photos at
camera-like sizes (one to three images per sample, some text-only) are written to a temp folder.

- ours: `InternVLLoader` end to end (read, DALI decode/resize/normalise with `num_threads`
  threads, tile, tokenize, pack into rows of `--seq-length`, collate micro-batches), in the
  main thread and behind a `Prefetcher` thread.
- InternVL: per sample, PIL decode, `dynamic_preprocess` (same grid rule and per-image cap),
  the per-tile transform (bicubic resize to 448, to tensor, ImageNet normalisation; torchvision's
  ops written out with PIL/numpy, as torchvision is not installed) and `tokenize_conversation`
  (no packing: our path does strictly more work). Run in the main process and with a torch
  DataLoader of `--workers` worker processes, as InternVL trains.

JPEG re-compression is off in both. Throughput counts samples and tiles that came out.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image
from transformers import AutoTokenizer

from megatron_internvl.data.chat import tokenize_conversation
from megatron_internvl.data.dali_pipeline import IMAGENET_MEAN, IMAGENET_STD
from megatron_internvl.data.loader import DatasetSpec, InternVLLoader, LoaderConfig, shard_list
from megatron_internvl.data.prefetch import Prefetcher
from megatron_internvl.data.shards import ShardReader, ShardWriter, read_index
from megatron_internvl.data.tiler import TilerConfig
from megatron_internvl.data.tiling import per_image_cap, tile_plan

ROOT = Path(__file__).resolve().parents[1]
S = 448


def make_shards(out: Path, n: int, seed: int = 0) -> tuple[str, ...]:
    """n samples of photos at 300..2000 px sides, 0-3 images each (mostly 1)."""
    rng = np.random.default_rng(seed)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
              skimage.data.rocket(), skimage.data.hubble_deep_field()]  # fmt: skip
    with ShardWriter(out, "bench", max_samples=64) as writer:
        for k in range(n):
            count = int(rng.choice([0, 1, 1, 1, 1, 2, 3]))
            members, question = {}, ""
            for i in range(count):
                size = (int(rng.integers(300, 2000)), int(rng.integers(300, 1500)))
                buffer = io.BytesIO()
                image = Image.fromarray(photos[(k + i) % len(photos)]).resize(size)
                image.save(buffer, format="JPEG", quality=90)
                members[f"{i}.jpg"] = buffer.getvalue()
                question += f"Image-{i + 1}: <image>\n" if count > 1 else "<image>\n"
            meta = {
                "images": [f"{i}.jpg" for i in range(count)],
                "conversations": [
                    {"from": "human", "value": question + "Describe the image in detail."},
                    {"from": "gpt", "value": "A photograph of a cat and a cup of coffee. " * 8},
                ],
            }
            writer.write({"json": json.dumps(meta).encode(), **members})
    return tuple(str(p) for p in writer.paths)


# --- InternVL's path ------------------------------------------------------------------------
def dynamic_preprocess(image: Image.Image, max_num: int) -> list[Image.Image]:
    """InternVL's `dynamic_preprocess` (grid rule shared with ours through `tiling`)."""
    plan = tile_plan(image.width, image.height, 1, max_num, S)
    resized = image.resize(plan.resize_wh)  # PIL's default filter, BICUBIC, as InternVL
    tiles = [resized.crop(box) for box in plan.boxes]
    if plan.thumbnail:
        tiles.append(image.resize((S, S)))
    return tiles


MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
STD = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


def transform(tile: Image.Image) -> torch.Tensor:
    """RGB -> Resize((S, S), BICUBIC) -> ToTensor -> Normalize(ImageNet), as InternVL builds it."""
    tile = tile.convert("RGB").resize((S, S), Image.Resampling.BICUBIC)
    chw = np.asarray(tile, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return torch.from_numpy((chw - MEAN) / STD)


class InternVLDataset(torch.utils.data.Dataset):
    """One sample: (tiles_nchw or None, input_ids, labels), computed InternVL's way."""

    def __init__(self, shards: tuple[str, ...], tokenizer_dir: str, max_num: int = 12) -> None:
        self.entries = [e for shard in shards for e in read_index(shard)]
        self.tokenizer_dir = tokenizer_dir
        self.max_num = max_num
        self.reader: ShardReader | None = None
        self.tokenizer = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        if self.reader is None:  # per worker process
            self.reader = ShardReader()
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        raw = self.reader.read(self.entries[index % len(self.entries)])
        cap = per_image_cap(self.max_num, max(1, len(raw.images)))
        per_image = []
        for data in raw.images:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            per_image.append(torch.stack([transform(t) for t in dynamic_preprocess(image, cap)]))
        ids, labels = tokenize_conversation(
            raw.meta["conversations"], [t.shape[0] for t in per_image], self.tokenizer
        )
        return (torch.cat(per_image) if per_image else None), ids, labels


def run_baseline(shards, tokenizer_dir: str, samples: int, workers: int) -> tuple[float, int, int]:
    """Seconds, samples and tiles for `samples` samples (after one warm-up sample per worker)."""
    dataset = InternVLDataset(shards, tokenizer_dir)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        sampler=range(samples + max(1, workers)),
        collate_fn=lambda x: x,
        prefetch_factor=4 if workers else None,
    )
    items = iter(loader)
    for _ in range(max(1, workers)):  # warm-up: worker start, tokenizer load
        next(items)
    start, tiles = time.perf_counter(), 0
    for _ in range(samples):
        tiles_nchw, _, _ = next(items)
        tiles += 0 if tiles_nchw is None else tiles_nchw.shape[0]
    return time.perf_counter() - start, samples, tiles


def run_ours(
    shards,
    tokenizer_dir: str,
    samples: int,
    seq_length: int,
    threads: int,
    device_id=None,
    prefetch: int = 0,
):
    """Seconds, samples and tiles until `samples` packed samples came out in micro-batches."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LoaderConfig(
        seq_length=seq_length,
        shuffle=False,
        tiler=TilerConfig(num_threads=threads, device_id=device_id),
    )
    loader = InternVLLoader([DatasetSpec("bench", shards)], tokenizer, cfg)
    stats = loader.packing_stats
    if prefetch:
        loader = Prefetcher(loader, prefetch)
    next(loader)  # warm-up: pipeline build, first allocations
    start, done, tiles = time.perf_counter(), 0, 0
    while done < samples:
        batch = next(loader)
        done += len(batch["sample_keys"])
        tiles += 0 if batch["images"] is None else batch["images"].shape[0]
    elapsed = time.perf_counter() - start
    if prefetch:
        loader.close()
    return elapsed, done, tiles, stats.fill_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, help="folder of shards (default: generated)")
    parser.add_argument("--tokenizer", default=str(ROOT / "demo" / "tokenizer"))
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--seq-length", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads")
    parser.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers")
    parser.add_argument("--device-id", type=int, default=None, help="GPU for DALI (mixed)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, pipelines interleaved")
    args = parser.parse_args()
    where = "CPU" if args.device_id is None else f"GPU {args.device_id}"
    names = [f"ours: DALI {where} ({args.threads} thr), prefetch {p}" for p in (0, 2)]
    names += [f"InternVL: PIL path, {w} DataLoader workers" for w in sorted({0, args.workers})]
    runs: dict[str, list[tuple[float, int, int]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        shards = shard_list([args.shards]) if args.shards else make_shards(Path(tmp), 200)
        # Rounds interleave the pipelines so that load from other processes hits all of them.
        for _ in range(args.repeats):
            for prefetch, name in zip((0, 2), names[:2], strict=True):
                seconds, n, tiles, fill = run_ours(
                    shards, args.tokenizer, args.samples, args.seq_length, args.threads,
                    args.device_id, prefetch,
                )  # fmt: skip
                runs[name].append((seconds, n, tiles))
            for workers, name in zip(sorted({0, args.workers}), names[2:], strict=True):
                runs[name].append(run_baseline(shards, args.tokenizer, args.samples, workers))
    print(f"\n{args.repeats} rounds of {args.samples} samples; best and median of the rounds")
    header = f"{'pipeline':44s} {'samples/s':>9s} {'tiles/s':>8s} {'median tiles/s':>15s}"
    print(header)
    best = {}
    for name, results in runs.items():
        rates = sorted((tiles / s, n / s) for s, n, tiles in results)
        best[name] = rates[-1][0]
        median = rates[len(rates) // 2][0]
        print(f"{name:44s} {rates[-1][1]:9.2f} {rates[-1][0]:8.1f} {median:15.1f}")
    ours = max(best[n] for n in names[:2])
    for name in names[2:]:
        print(f"tiles/s ratio, best of ours / {name}: {ours / best[name]:.2f}x")
    print(f"packing fill rate (ours, seq_length {args.seq_length}): {100 * fill:.1f}%")


if __name__ == "__main__":
    main()
