"""Data throughput: our loader (DALI tiling + chat tokens + packing) vs InternVL's own path.

Usage: python benchmarks/data_throughput.py [--device cpu|gpu] [--no-jpeg] [--samples 160]
       [--repeats 3] [--shards DIR] [--tokenizer DIR] [--layout mixed|caption|video]

Both read the same shards in the same run, rounds interleaved. Without --shards, shards are
written to a temp folder: `mixed`, scikit-image photos at camera-like sizes (one to three images
per sample, some text-only, conversations); `caption`, one photo + `.txt` caption per sample
(img2dataset's layout); `video`, an .mp4 clip per sample (48 frames of 320x240 panning over a
photo), for which the baseline is InternVL's video path (`read_frames_decord`: decord's
`VideoReader(num_threads=1).get_batch`, or PyAV where decord is not installed (the header
says which), PIL frames, then `video_get_item`'s transform per frame: one tile each).

- ours: `InternVLLoader` end to end (read, DALI decode, bicubic resizes (`--device cpu`: torch's
  uint8 kernel on `--threads` host threads; `gpu`: DALI "mixed" decoding and GPU resize), JPEG
  re-compression, tiles, tokens, packing into rows of `--seq-length`, float micro-batches), in
  the main thread and behind a `Prefetcher` thread.
- InternVL: per sample, PIL decode, `dynamic_preprocess` (same grid rule and per-image cap)
  and InternVL's training transform per tile (RGB, JPEG re-compression at a random quality in
  75..100, Resize(448, BICUBIC), ToTensor, Normalize(ImageNet); torchvision's ops written out
  in PIL/torch, as torchvision is not a dependency), then `tokenize_conversation` (no packing:
  ours does strictly more work). Run in the main process and with a torch DataLoader of
  `--workers` worker processes, as InternVL trains.

JPEG re-compression: InternVL draws a quality per tile, ours per image (grid image and
thumbnail); the pixels compressed are the same. `--no-jpeg` turns it off in both (InternVL's
evaluation transform). For video InternVL compresses the frame before its Resize, ours the
448 tile after it. Throughput counts samples and tiles that came out after a warm-up: ours
after its first micro-batch (the packer's open rows filled, as in steady state; closed rows
still waiting then, at most one `--read-ahead` fill, count in the window), InternVL after one
sample per worker (its workers' prefetch may run ahead of the window). A short window is
biased by that fill: keep `--samples` several fills long (default 160 vs 32).

The three cases, as the README's data section lists them:
  python benchmarks/data_throughput.py --layout mixed
  python benchmarks/data_throughput.py --layout caption
  python benchmarks/data_throughput.py --layout video
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`

import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from megatron_internvl.data.chat import tokenize_conversation  # noqa: E402
from megatron_internvl.data.loader import (  # noqa: E402
    DatasetSpec,
    InternVLLoader,
    LoaderConfig,
    shard_list,
)
from megatron_internvl.data.pixels import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from megatron_internvl.data.prefetch import Prefetcher  # noqa: E402
from megatron_internvl.data.samples import SampleConfig, read_sample  # noqa: E402
from megatron_internvl.data.shard_index import read_index  # noqa: E402
from megatron_internvl.data.shard_reader import ShardReader  # noqa: E402
from megatron_internvl.data.shard_writer import ShardWriter  # noqa: E402
from megatron_internvl.data.tiler import TilerConfig  # noqa: E402
from megatron_internvl.data.tiling import per_image_cap, tile_plan  # noqa: E402
from megatron_internvl.data.video import choose_frames  # noqa: E402

S = 448
VIDEO_FRAMES = (8, 32)  # InternVL 2.5's min/max frames per video; ours: data.video_frames
try:  # InternVL's video reader; PyAV (FFmpeg, ours too) where it does not install
    import decord

    VIDEO_DECODER = "decord"
except ImportError:
    VIDEO_DECODER = "PyAV"
QUALITIES = (75, 100)  # InternVL's build_transform: qualities = range(75, 101)
Result = tuple[float, int, int, float]
"""(seconds, samples, tiles, CPU seconds of this process's threads and its worker processes)."""


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its children that have exited."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")


def photo_jpeg(k: int, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    photo = getattr(skimage.data, PHOTOS[k % len(PHOTOS)])()
    Image.fromarray(photo).resize(size).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_caption_shards(out: Path, n: int, seed: int = 0) -> tuple[str, ...]:
    """n img2dataset-style samples: one photo at 300..2000 px sides + a caption."""
    rng = np.random.default_rng(seed)
    with ShardWriter(out, "caption", max_samples=64) as writer:
        for k in range(n):
            size = (int(rng.integers(300, 2000)), int(rng.integers(300, 1500)))
            meta = {"width": size[0], "height": size[1], "similarity": 0.3}
            writer.write({"jpg": photo_jpeg(k, size), "txt": b"A photograph of a cat. " * 4,
                          "json": json.dumps(meta).encode()})  # fmt: skip
    return tuple(str(p) for p in writer.paths)


def make_video_shards(out: Path, n: int, frames: int = 48) -> tuple[str, ...]:
    """n samples of one .mp4 clip each (a 320x240 window panning across a photo)."""
    import av

    question = {"from": "human", "value": "<video>\nWhat does the camera do?"}
    meta = {"conversations": [question, {"from": "gpt", "value": "It pans to the right."}]}
    with ShardWriter(out, "video", max_samples=16) as writer:
        for k in range(n):
            photo = np.asarray(Image.fromarray(getattr(skimage.data, PHOTOS[k % 5])()).resize(
                (640, 480)).convert("RGB"))  # fmt: skip
            buffer = io.BytesIO()
            with av.open(buffer, "w", format="mp4") as container:
                stream = container.add_stream("mpeg4", rate=25)
                stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
                for i in range(frames):
                    window = np.ascontiguousarray(photo[100:340, 6 * i : 6 * i + 320])
                    for packet in stream.encode(av.VideoFrame.from_ndarray(window, "rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            writer.write({"mp4": buffer.getvalue(), "json": json.dumps(meta).encode()})
    return tuple(str(p) for p in writer.paths)


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


MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def jpeg_degrade(image: Image.Image, quality: int) -> Image.Image:
    """InternVL's `simulate_jpeg_degradation`: save as JPEG at `quality`, load it back."""
    with io.BytesIO() as buffer:
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        return Image.open(buffer).copy()


def transform(tile: Image.Image, rng: np.random.Generator | None) -> torch.Tensor:
    """InternVL's `build_transform` per tile (training: with `rng`, a random JPEG quality)."""
    tile = tile.convert("RGB") if tile.mode != "RGB" else tile
    if rng is not None:  # T.RandomChoice over jpeg_degrade_functions
        tile = jpeg_degrade(tile, int(rng.integers(QUALITIES[0], QUALITIES[1] + 1)))
    tile = tile.resize((S, S), Image.Resampling.BICUBIC)  # T.Resize((S, S), BICUBIC)
    # T.ToTensor then T.Normalize, as torchvision computes them.
    chw = torch.from_numpy(np.array(tile, copy=True)).permute(2, 0, 1).contiguous()
    return chw.to(torch.float32).div(255).sub_(MEAN).div_(STD)


class InternVLDataset(torch.utils.data.Dataset):
    """One sample: (tiles_nchw or None, input_ids, labels), computed InternVL's way."""

    def __init__(self, shards: tuple[str, ...], tokenizer_dir: str, jpeg: bool) -> None:
        self.entries = [e for shard in shards for e in read_index(shard)]
        self.tokenizer_dir = tokenizer_dir
        self.jpeg = jpeg
        self.reader: ShardReader | None = None
        self.tokenizer = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        if self.reader is None:  # per worker process
            self.reader = ShardReader()
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        rng = np.random.default_rng(index) if self.jpeg else None
        entry = self.entries[index % len(self.entries)]
        if "mp4" in entry.members:
            frames, conversation = self.video_frames(entry)
            # InternVL's video_get_item: `transform` per frame (its Resize makes the one tile;
            # no dynamic_preprocess, no thumbnail).
            per_image = [torch.stack([transform(frame, rng) for frame in frames])]
            ids, labels = tokenize_conversation(conversation, [1] * len(frames), self.tokenizer)
            return per_image[0], ids, labels
        raw = read_sample(self.reader, entry, SampleConfig())
        images = [Image.open(io.BytesIO(d)).convert("RGB") for d in raw.images]
        cap = per_image_cap(12, max(1, len(images)))
        per_image = []
        for image in images:
            tiles = [transform(t, rng) for t in dynamic_preprocess(image, cap)]
            per_image.append(torch.stack(tiles))
        ids, labels = tokenize_conversation(
            raw.conversations, [t.shape[0] for t in per_image], self.tokenizer
        )
        return (torch.cat(per_image) if per_image else None), ids, labels

    def video_frames(self, entry) -> tuple[list[Image.Image], list[dict]]:
        """InternVL's `read_frames_decord` (PyAV where decord is missing): the frames chosen as
        ours chooses them, as PIL images, and the `Frame-i: <image>` prompt."""
        meta = json.loads(self.reader.read_member(entry, "json"))
        data = self.reader.read_member(entry, "mp4")
        if VIDEO_DECODER == "decord":
            reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
            picks = choose_frames(entry.key, len(reader), VIDEO_FRAMES)
            frames = [Image.fromarray(f) for f in reader.get_batch(picks).asnumpy()]
        else:
            import av

            with av.open(io.BytesIO(data)) as container:
                stream = container.streams.video[0]
                vlen = stream.frames or sum(1 for p in container.demux(stream) if p.size)
                wanted = set(choose_frames(entry.key, vlen, VIDEO_FRAMES))
                container.seek(0)
                decoded = enumerate(container.decode(stream))
                frames = [f.to_image() for i, f in decoded if i in wanted]
        lines = "\n".join(f"Frame-{i + 1}: <image>" for i in range(len(frames)))
        turns = [dict(t) for t in meta["conversations"]]
        turns[0]["value"] = turns[0]["value"].replace("<video>\n", lines + "\n")
        return frames, turns


def run_baseline(shards, tokenizer_dir: str, samples: int, workers: int, jpeg: bool) -> Result:
    """Seconds, samples and tiles for `samples` samples (after one warm-up sample per worker)."""
    dataset = InternVLDataset(shards, tokenizer_dir, jpeg)
    threads = torch.get_num_threads()
    if not workers:  # one torch thread, as in a DataLoader worker (torch sets it there)
        torch.set_num_threads(1)
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
    start, tiles, cpu = time.perf_counter(), 0, cpu_seconds()
    for _ in range(samples):
        tiles_nchw, _, _ = next(items)
        tiles += 0 if tiles_nchw is None else tiles_nchw.shape[0]
    elapsed = time.perf_counter() - start
    del items  # joins the workers, so that their CPU time is counted
    cpu = cpu_seconds() - cpu
    torch.set_num_threads(threads)
    return elapsed, samples, tiles, cpu


def run_ours(shards, tokenizer_dir: str, samples: int, prefetch: int, args) -> Result:
    """Seconds, samples and tiles until `samples` packed samples came out in micro-batches."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LoaderConfig(
        sample=SampleConfig(video_frames=VIDEO_FRAMES),
        seq_length=args.seq_length,
        shuffle=False,
        read_ahead=args.read_ahead,
        tiler=TilerConfig(
            num_threads=args.threads,
            device_id=0 if args.device == "gpu" else None,
            jpeg_quality=QUALITIES if args.jpeg else None,
            resize=args.resize,
        ),
    )
    loader = InternVLLoader([DatasetSpec("bench", shards)], tokenizer, cfg)
    source = Prefetcher(loader, prefetch) if prefetch else loader
    # Warm-up: pipelines' first runs and the packer's open rows filled (until the first row
    # closes; in steady state they stay full). The rows closed with it that are still waiting
    # (at most one fill) count in the window; rows prepared but not consumed at its end do not.
    next(source)
    start, done, tiles, cpu = time.perf_counter(), 0, 0, cpu_seconds()
    while done < samples:
        batch = next(source)
        done += len(batch["sample_keys"])
        tiles += 0 if batch["images"] is None else batch["images"].shape[0]
    if args.device == "gpu":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if prefetch:
        source.close()
    return elapsed, done, tiles, cpu_seconds() - cpu


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu}, {cores} usable cores, torch {torch.__version__} ({torch.get_num_threads()} thr)"
    if device == "gpu":
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


LAYOUTS = {
    "mixed": (make_shards, 200),
    "caption": (make_caption_shards, 200),
    "video": (make_video_shards, 32),
}
"""--layout -> (shard maker, samples written)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="ours: DALI on")
    parser.add_argument("--shards", type=Path, help="folder of shards (default: generated)")
    parser.add_argument("--tokenizer", default=str(ROOT / "demo" / "tokenizer"))
    parser.add_argument("--samples", type=int, default=160, help="timed samples per run")
    parser.add_argument("--seq-length", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2, help="ours: DALI and host threads")
    parser.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers")
    parser.add_argument("--no-jpeg", dest="jpeg", action="store_false", help="both: no JPEG aug")
    parser.add_argument("--resize", default="auto", choices=["auto", "dali", "host"])
    parser.add_argument("--repeats", type=int, default=3, help="rounds, pipelines interleaved")
    parser.add_argument("--read-ahead", type=int, default=32, help="ours: samples per fill")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="mixed", help="shards made")
    args = parser.parse_args()
    if args.device == "gpu" and not torch.cuda.is_available():
        parser.error("--device gpu: torch sees no CUDA device")
    where = f"DALI {args.device.upper()}, {args.threads} thr"
    ours = [f"ours ({where}), prefetch {p}" for p in (0, 2)]
    path = f"InternVL {VIDEO_DECODER}+PIL" if args.layout == "video" else "InternVL PIL path"
    theirs = [f"{path}, {w} DataLoader workers" for w in sorted({0, args.workers})]
    runs: dict[str, list[Result]] = {name: [] for name in ours + theirs}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        make, count = LAYOUTS[args.layout]
        shards = shard_list([args.shards]) if args.shards else make(Path(tmp), count)
        # Rounds interleave the pipelines so that load from other processes hits all of them.
        for _ in range(args.repeats):
            for prefetch, name in zip((0, 2), ours, strict=True):
                runs[name].append(run_ours(shards, args.tokenizer, args.samples, prefetch, args))
            for workers, name in zip(sorted({0, args.workers}), theirs, strict=True):
                result = run_baseline(shards, args.tokenizer, args.samples, workers, args.jpeg)
                runs[name].append(result)
    jpeg = f"JPEG re-compression {QUALITIES[0]}..{QUALITIES[1]}" if args.jpeg else "no JPEG"
    print(f"\nmachine: {machine(args.device)}")
    load_after = os.getloadavg()
    print(f"load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f}")
    print(
        f"{args.layout} shards; {args.repeats} rounds of {args.samples} samples, {jpeg}; best and "
        "median of rounds"
    )
    print(
        f"{'pipeline':46s} {'samples/s':>9s} {'tiles/s':>8s} {'median tiles/s':>15s} "
        f"{'CPU ms/tile':>11s}"
    )
    best, median, cpu = {}, {}, {}
    for name, results in runs.items():
        rates = sorted((tiles / s, n / s) for s, n, tiles, _ in results)
        best[name], median[name] = rates[-1][0], rates[len(rates) // 2][0]
        # CPU time per tile: less sensitive to other processes' load than wall time.
        cpu[name] = min(1000 * c / tiles for _, _, tiles, c in results)
        print(
            f"{name:46s} {rates[-1][1]:9.2f} {rates[-1][0]:8.1f} {median[name]:15.1f} "
            f"{cpu[name]:11.2f}"
        )
    top = max(ours, key=best.get)
    for name in theirs:
        print(
            f"ratio {top.split(', ')[-1]} / {name}: tiles/s best {best[top] / best[name]:.2f}x, "
            f"median {median[top] / median[name]:.2f}x; CPU per tile {cpu[name] / cpu[top]:.2f}x"
        )


if __name__ == "__main__":
    main()
