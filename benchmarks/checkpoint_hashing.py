"""What checksumming costs a checkpoint save: Megatron's dist_checkpointing.save of the same
state, with and without the hashing writer (checkpoint/integrity.py), rounds interleaved, in one
process (a one-rank gloo world). Also prints what verifying at load costs: a full read + sha256.

Usage: python benchmarks/checkpoint_hashing.py [--mb 512] [--repeats 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_internvl.checkpoint import integrity
from megatron_internvl.parallel.runtime import single_process


def _state(megabytes: int) -> dict[str, ShardedTensor]:
    per_tensor = 16 * 2**20 // 4  # 16 MB fp32 tensors, like a mid-size weight
    count = max(megabytes // 16, 1)
    generator = torch.Generator().manual_seed(0)
    return {
        f"w{i}": ShardedTensor.from_rank_offsets(
            f"w{i}", torch.randn(per_tensor, generator=generator), replica_id=0
        )
        for i in range(count)
    }


def _save(state: dict, root: Path, hashed: bool) -> float:
    target = Path(tempfile.mkdtemp(dir=root))
    started = time.perf_counter()
    if hashed:
        with integrity.hashing_writes():
            dist_checkpointing.save(state, str(target))
        integrity.collect(target)  # what the commit does: read the sidecars + small files
    else:
        dist_checkpointing.save(state, str(target))
    seconds = time.perf_counter() - started
    shutil.rmtree(target)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="checkpoint size in MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir))
    with single_process():
        state = _state(args.mb)
        _save(state, root, hashed=False)  # warm-up: page cache, imports
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for hashed in (False, True):
                times[hashed].append(_save(state, root, hashed))
    data = torch.randn(64 * 2**20 // 4).numpy().tobytes()
    started = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    sha_mb_s = 64 / (time.perf_counter() - started)
    shutil.rmtree(root)
    plain, hashed = min(times[False]), min(times[True])
    print(f"checkpoint of {args.mb} MB, best of {args.repeats} (seconds):")
    print(f"  save, no checksums        {plain:7.2f}  ({args.mb / plain:7.0f} MB/s)")
    print(f"  save, sha256 while writing {hashed:6.2f}  ({args.mb / hashed:7.0f} MB/s)")
    print(f"  overhead                  {100 * (hashed - plain) / plain:+6.1f} %")
    print(f"  sha256 alone: {sha_mb_s:.0f} MB/s on one core; verifying at load reads the")
    print(f"  checkpoint once more, each rank a share of the files (~{args.mb / sha_mb_s:.2f} s")
    print("  of hashing for this size on one rank, plus the read)")


if __name__ == "__main__":
    main()
