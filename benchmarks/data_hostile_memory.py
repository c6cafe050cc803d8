"""Loader peak memory on the hostile shards of issue 17, next to a clean shard of the same shape.

Usage:
  python benchmarks/data_hostile_memory.py [--read-ahead 32]

Each hostile shard (tests/hostile_shards.py: a 13000x13000 PNG header, four 5000x5000 images in
one sample, a 5 MB JSON of small objects, a 200k-character turn, JSON nested 100k deep, a
5000-digit integer, a list where a role belongs, index entries with a huge size, a negative
offset or a name with a space) holds one hostile sample between good ones. Each shard, and a
clean shard of the same shape (the baseline), is read by a fresh process running one loader
read-ahead (default 32, the loader's: each sample read 8 times); its peak RSS (ru_maxrss) is
printed next to the baseline's. The per-sample limits stop each case before the work.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoTokenizer  # noqa: E402

from megatron_internvl.data.loader import DatasetSpec, InternVLLoader, LoaderConfig  # noqa: E402
from megatron_internvl.data.shard_writer import ShardWriter  # noqa: E402
from megatron_internvl.data.tiler import TilerConfig  # noqa: E402
from tests.hostile_shards import CASES, GOOD, write_case  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_once(shard: str, tokenizer, read_ahead: int) -> dict:
    cfg = LoaderConfig(
        seq_length=1024,
        read_ahead=read_ahead,
        shuffle=False,
        skip_check_after=10**6,
        system_prompt=None,
        tiler=TilerConfig(max_num=12, batch_size=8),
    )
    loader = InternVLLoader([DatasetSpec("x", (shard,))], tokenizer, cfg)
    start = time.perf_counter()
    loader._fill()  # one read-ahead: every sample of the shard at least once
    seconds = time.perf_counter() - start
    skips = dict(loader.skips)
    loader.close()
    return {"seconds": seconds, "skips": skips}


def measure(name: str, tmp: str, read_ahead: int) -> dict:
    """Peak RSS, seconds and skips of one loader read-ahead over one case, in a fresh process."""
    command = [
        sys.executable,
        __file__,
        "--one",
        name,
        "--tmp",
        tmp,
        "--read-ahead",
        str(read_ahead),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def one(name: str, tmp: Path, read_ahead: int) -> None:
    logging.disable(logging.WARNING)  # the skips are counted; one line each is noise here
    if name == "clean":
        with ShardWriter(tmp / "clean", "clean", max_samples=None) as writer:
            for _ in range(4):
                writer.write(GOOD)
        shard = str(writer.paths[0])
    else:
        shard, _ = write_case(tmp / name, name)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "demo" / "tokenizer")
    result = run_once(shard, tokenizer, read_ahead)
    print(json.dumps({**result, "peak_mb": peak_mb()}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--read-ahead", type=int, default=32, help="the loader's default")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        one(args.one, args.tmp, args.read_ahead)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        clean = measure("clean", tmp, args.read_ahead)
        print(f"read-ahead {args.read_ahead}; clean shard: peak RSS {clean['peak_mb']:.0f} MB")
        print(f"{'case':<24} {'peak MB':>8} {'clean MB':>9} {'growth':>7} {'s':>6}  skipped")
        worst = 0.0
        for name in CASES:
            result = measure(name, tmp, args.read_ahead)
            growth = result["peak_mb"] - clean["peak_mb"]
            worst = max(worst, growth)
            print(
                f"{name:<24} {result['peak_mb']:>8.0f} {clean['peak_mb']:>9.0f} {growth:>+7.0f} "
                f"{result['seconds']:>6.2f}  {result['skips']}"
            )
        print(f"largest growth over the clean shard: {worst:+.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
