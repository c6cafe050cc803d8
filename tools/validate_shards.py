"""Check every sample of some shards; report bad ones and optionally write clean shards.

Usage:
  python tools/validate_shards.py shards/ [more.tar ...] [--clean-dir clean/] [--fix-index]

Each sample goes through the loader's own parser (megatron_internvl/data/samples.py: layouts,
conversation, placeholders, work limits) and its images are fully decoded; each shard's index
must match its tar (--fix-index rewrites a missing, stale or unreadable one, or says why it
cannot). Bad samples are printed as `<shard>:<key>: <reason>: <detail>`. With --clean-dir, the
good samples are written there as shards of the same names (a new folder: never an input's).
Exit status: 0 all good, 1 bad samples or index problems found, 2 could not run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_internvl.data.errors import DataError
from megatron_internvl.data.shard_index import shard_list
from megatron_internvl.data.shard_validation import validate_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help=".tar files or folders of them")
    parser.add_argument("--clean-dir", type=Path, help="write the good samples here")
    parser.add_argument(
        "--fix-index", action="store_true", help="rewrite missing or stale index files"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        paths = shard_list(args.paths)
        report = validate_shards(
            paths, args.clean_dir, progress_bar=not args.no_progress, fix_index=args.fix_index
        )
    except (DataError, OSError) as error:
        print(f"validate_shards: {error}", file=sys.stderr)
        return 2
    print(report.format())
    return 1 if report.bad or report.index_problems else 0


if __name__ == "__main__":
    sys.exit(main())
