"""Check every sample of some shards; report bad ones and optionally write clean shards.

Usage:
  python tools/validate_shards.py shards/ [more.tar ...] [--clean-dir clean/] [--fix-index]

Checks: the tar reads to its end, each sample has a valid `.json` member (conversation, image
list), each listed image is present and decodes fully, and the number of `<image>` placeholders
equals the number of images; each shard's DALI index lists its samples (--fix-index rewrites a
missing or stale one). Bad samples are printed as `<shard>:<key>: <reason>: <detail>`.
With --clean-dir, the good samples are written as shards of the same names there, with fresh
DALI indexes. Exit status: 0 when all samples are good, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_internvl.data.loader import shard_list
from megatron_internvl.data.shards import validate_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help=".tar files or folders of them")
    parser.add_argument("--clean-dir", type=Path, help="write the good samples here")
    parser.add_argument(
        "--fix-index", action="store_true", help="rewrite missing or stale DALI index files"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    paths = shard_list(args.paths)
    if not paths:
        parser.error(f"no .tar files in {[str(p) for p in args.paths]}")
    report = validate_shards(
        paths, args.clean_dir, progress=not args.no_progress, fix_index=args.fix_index
    )
    print(report.format())
    return 1 if report.bad or report.index_problems else 0


if __name__ == "__main__":
    sys.exit(main())
