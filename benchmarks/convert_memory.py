#!/usr/bin/env python
"""Peak memory of the HF <-> Megatron converter against the checkpoint's shard and total sizes.

Writes a synthetic transformers-native checkpoint of a real flavour (random bf16 weights, real
widths, optionally fewer LLM layers) in several shards, converts it to a Megatron dist
checkpoint and back, each conversion in a fresh child process, and prints each child's peak RSS
(its own, and that of the checkpoint-writer processes Megatron forks).

    python benchmarks/convert_memory.py                      # internvl2_5_1b, ~1.9 GB bf16
    python benchmarks/convert_memory.py --model internvl2_5_4b --llm-layers 8 --shard-mb 400
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

GiB = 2**30


def _make_checkpoint(spec, out: Path, shard_bytes: int) -> dict:
    import torch
    import transformers

    from megatron_internvl.checkpoint import hf_files
    from megatron_internvl.checkpoint.hf_config import native_config
    from megatron_internvl.checkpoint.hf_mappings import native_file_name

    out.mkdir(parents=True)
    config = native_config(spec, "bfloat16")
    with torch.device("meta"):
        shapes = {
            native_file_name(k): tuple(v.shape)
            for k, v in transformers.InternVLForConditionalGeneration(config).state_dict().items()
        }
    sizes = [(n, 2 * torch.Size(s).numel()) for n, s in shapes.items()]
    shards = hf_files.plan_shards(sizes, shard_bytes)
    weight_map, shard_sizes = {}, []
    gen = torch.Generator().manual_seed(0)
    for k, names in enumerate(shards):
        name = hf_files.shard_name(k + 1, len(shards))
        tensors = {n: torch.randn(shapes[n], generator=gen).to(torch.bfloat16) for n in names}
        hf_files.write_shard(out, name, tensors)
        weight_map.update(dict.fromkeys(names, name))
        shard_sizes.append((out / name).stat().st_size)
        del tensors
    total = sum(size for _, size in sizes)
    hf_files.write_index(out, weight_map, total)
    payload = config.to_dict()
    (out / "config.json").write_text(json.dumps(payload))
    return {"shards": len(shards), "largest_shard": max(shard_sizes), "total": sum(shard_sizes)}


def _child(args: argparse.Namespace) -> None:
    """One conversion in this process; prints a JSON line with peak RSS figures."""
    warnings.filterwarnings("ignore")
    from megatron_internvl.checkpoint import convert
    from megatron_internvl.models import registry

    registry.REGISTRY[args.spec.name] = args.spec  # the reduced-depth flavour, in this process
    start = time.perf_counter()
    if args.child == "to-megatron":
        convert.hf_to_megatron(args.src, args.dst, args.spec.name, log=lambda m: None)
    else:
        shard = args.shard_mb * 2**20
        convert.megatron_to_hf(args.src, args.dst, max_shard_bytes=shard, log=lambda m: None)
    seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    writers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"peak_rss": own, "writer_peak_rss": writers, "seconds": seconds}))


def _reduced(model: str, llm_layers: int | None):
    from megatron_internvl.models.registry import get_spec

    spec = get_spec(model)
    if llm_layers is None:
        return spec
    language = dataclasses.replace(spec.language, num_layers=llm_layers)
    return dataclasses.replace(spec, name=f"{model}_{llm_layers}l", language=language)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="internvl2_5_1b")
    parser.add_argument("--llm-layers", type=int, help="fewer LLM layers (real widths)")
    parser.add_argument("--shard-mb", type=int, default=512, help="HF shard size, both ways")
    parser.add_argument("--workdir", help="where to write (default: a temporary directory)")
    parser.add_argument("--child", choices=["to-megatron", "to-hf"], help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--dst", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    args.spec = _reduced(args.model, args.llm_layers)
    if args.child:
        _child(args)
        return 0

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        print(f"writing a synthetic {args.spec.name} checkpoint (bf16) ...", flush=True)
        sizes = _make_checkpoint(args.spec, root / "hf", args.shard_mb * 2**20)
        rows = []
        for step, src, dst in (("to-megatron", "hf", "mg"), ("to-hf", "mg", "back")):
            command = [sys.executable, __file__, "--model", args.model, "--child", step]
            command += ["--src", str(root / src), "--dst", str(root / dst)]
            command += ["--shard-mb", str(args.shard_mb)]
            if args.llm_layers:
                command += ["--llm-layers", str(args.llm_layers)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                print(done.stderr[-4000:], file=sys.stderr)
                return 1
            rows.append((step, json.loads(done.stdout.strip().splitlines()[-1])))
        print(
            f"\n{args.spec.name}: {sizes['total'] / GiB:.2f} GiB in {sizes['shards']} shards, "
            f"largest {sizes['largest_shard'] / GiB:.2f} GiB"
        )
        print(
            f"{'step':<12} {'peak RSS':>9} {'/largest':>9} {'/total':>7} {'writers':>9} {'time':>7}"
        )
        for step, r in rows:
            peak = r["peak_rss"]
            print(
                f"{step:<12} {peak / GiB:>7.2f}Gi {peak / sizes['largest_shard']:>8.1f}x "
                f"{peak / sizes['total']:>6.2f}x {r['writer_peak_rss'] / GiB:>7.2f}Gi "
                f"{r['seconds']:>6.1f}s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
