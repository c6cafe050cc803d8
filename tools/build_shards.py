"""Build WebDataset shards (+ DALI indexes) from a LLaVA-style JSON/JSONL file and an image root.

Usage:
  python tools/build_shards.py --json data.jsonl --image-root images/ --out shards/ \
      [--prefix train] [--max-samples 1000] [--max-bytes 1e9]
  python tools/build_shards.py --demo --out shards/      # the demo data in demo/data

The shard format is documented in megatron_internvl/data/shards.py. Records that cannot become
a valid sample are skipped and listed in the summary; the exit status is 1 when any were.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_internvl.data.demo_data import DEMO_DIR
from megatron_internvl.data.shards import build_shards, load_records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="LLaVA-style .json (list) or .jsonl file")
    parser.add_argument("--image-root", type=Path, help="folder the records' image paths start at")
    parser.add_argument("--demo", action="store_true", help="use demo/data/demo.json and images")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prefix", default="shard")
    parser.add_argument("--max-samples", type=int, default=1000, help="samples per shard (0: any)")
    parser.add_argument("--max-bytes", type=float, default=None, help="bytes per shard")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.demo:
        args.json, args.image_root = DEMO_DIR / "data" / "demo.json", DEMO_DIR / "data"
    if args.json is None or args.image_root is None:
        parser.error("give --json and --image-root, or --demo")
    summary = build_shards(
        load_records(args.json),
        args.image_root,
        args.out,
        prefix=args.prefix,
        max_samples=args.max_samples or None,
        max_bytes=int(args.max_bytes) if args.max_bytes else None,
        progress=not args.no_progress,
    )
    print(summary.format())
    return 1 if summary.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
