"""Build WebDataset shards (+ indexes) from LLaVA-style records or an img2dataset folder.

Usage:
  python tools/build_shards.py --json data.jsonl --image-root images/ --out shards/ \
      [--prefix train] [--max-samples 1000] [--max-bytes 1e9]
  python tools/build_shards.py --img2dataset laion_files/ --out shards/   # caption data
  python tools/build_shards.py --demo --out shards/      # the demo data in demo/data

The layouts are documented in megatron_internvl/data/samples.py. Records that cannot become a
valid sample are skipped and listed in the summary. Exit status: 0 all written, 1 some records
skipped, 2 nothing could be done (bad arguments or input; one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_internvl.data.demo_data import DEMO_DIR
from megatron_internvl.data.errors import DataError
from megatron_internvl.data.shard_builders import (
    ShardOutput,
    build_caption_shards,
    build_shards,
    load_records,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="LLaVA-style .json (list) or .jsonl file")
    parser.add_argument("--image-root", type=Path, help="folder the records' image paths start at")
    parser.add_argument("--img2dataset", type=Path, help="img2dataset output ('files' format)")
    parser.add_argument("--demo", action="store_true", help="use demo/data/demo.json and images")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prefix", default="shard", help="shard names: <prefix>-NNNNNN.tar")
    parser.add_argument("--max-samples", type=int, default=1000, help="samples per shard (0: any)")
    parser.add_argument("--max-bytes", type=float, default=None, help="bytes per shard")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.demo:
        args.json, args.image_root = DEMO_DIR / "data" / "demo.json", DEMO_DIR / "data"
    if args.img2dataset is None and (args.json is None or args.image_root is None):
        parser.error("give --json and --image-root, --img2dataset, or --demo")
    output = ShardOutput(
        args.out,
        args.prefix,
        max_samples=args.max_samples or None,
        max_bytes=int(args.max_bytes) if args.max_bytes else None,
        progress_bar=not args.no_progress,
    )
    try:
        if args.img2dataset is not None:
            summary = build_caption_shards(args.img2dataset, output)
        else:
            summary = build_shards(load_records(args.json), args.image_root, output)
    except (DataError, OSError) as error:
        print(f"build_shards: {error}", file=sys.stderr)
        return 2
    print(summary.format())
    return 1 if summary.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
