#!/usr/bin/env python
"""Peak memory of the HF <-> Megatron converter against the checkpoint's shard and total sizes.

Writes a synthetic transformers-native checkpoint of a real flavour (random bf16 weights, real
widths, optionally fewer LLM layers) in several shards, converts it to a Megatron dist
checkpoint and back, each conversion in a fresh child process, checks the way back is bit-exact
(tensor by tensor), and prints for each direction the child's peak RSS, its RSS after imports
(the baseline: Python + torch + Megatron), the difference, and that difference over the largest
HF shard. `--old REF` also runs the converter of git revision REF (e.g. HEAD) on the same
checkpoint, for comparison.

    python benchmarks/convert_memory.py                      # internvl2_5_1b, 1.75 GiB bf16
    python benchmarks/convert_memory.py --old HEAD           # ... and the committed converter
    python benchmarks/convert_memory.py --model internvl2_5_4b --llm-layers 8 --shard-mb 400
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

GiB = 2**30
ROOT = Path(__file__).resolve().parent.parent


def _status(field: str) -> int:
    """A /proc/self/status memory figure in bytes. VmHWM (peak RSS) is per address space, so
    unlike ru_maxrss it does not include the parent's RSS from before the child's exec."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def _make_checkpoint(spec, out: Path, shard_bytes: int) -> dict:
    """Random bf16 tensors of transformers' shapes, written one tensor at a time."""
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
        writer = hf_files.ShardWriter(out / name, [(n, shapes[n]) for n in names], torch.bfloat16)
        for n in names:
            writer.write(n, torch.randn(shapes[n], generator=gen).to(torch.bfloat16))
        writer.close()
        weight_map.update(dict.fromkeys(names, name))
        shard_sizes.append((out / name).stat().st_size)
    total = sum(size for _, size in sizes)
    hf_files.write_index(out, weight_map, total)
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    return {"shards": len(shards), "largest_shard": max(shard_sizes), "total": sum(shard_sizes)}


def _same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of HF checkpoint `a` equals the one of the same name in `b`, bit for bit."""
    import torch
    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        return {name: folder / file for name, file in index["weight_map"].items()}

    left, right = where(a), where(b)
    if left.keys() != right.keys():
        return False
    for name in left:
        with safe_open(str(left[name]), "pt") as f, safe_open(str(right[name]), "pt") as g:
            if not torch.equal(f.get_tensor(name), g.get_tensor(name)):
                return False
    return True


def _child(args: argparse.Namespace) -> None:
    """One conversion in this process; prints a JSON line with RSS figures."""
    warnings.filterwarnings("ignore")
    from megatron_internvl.checkpoint import convert
    from megatron_internvl.models import registry

    registry.REGISTRY[args.spec.name] = args.spec  # the reduced-depth flavour, in this process
    baseline = _status("VmRSS")
    start = time.perf_counter()
    if args.child == "to-megatron":
        convert.hf_to_megatron(args.src, args.dst, args.spec.name, log=lambda m: None)
    else:
        shard = args.shard_mb * 2**20
        convert.megatron_to_hf(args.src, args.dst, max_shard_bytes=shard, log=lambda m: None)
    seconds = time.perf_counter() - start
    own = _status("VmHWM")
    writers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    record = {"peak_rss": own, "baseline_rss": baseline, "writer_peak_rss": writers}
    print(json.dumps({**record, "seconds": seconds}))


def _reduced(model: str, llm_layers: int | None):
    from megatron_internvl.models.registry import get_spec

    spec = get_spec(model)
    if llm_layers is None:
        return spec
    language = dataclasses.replace(spec.language, num_layers=llm_layers)
    return dataclasses.replace(spec, name=f"{model}_{llm_layers}l", language=language)


def _run(args, step: str, src: Path, dst: Path, code: Path | None) -> dict:
    command = [sys.executable, __file__, "--model", args.model, "--child", step]
    command += ["--src", str(src), "--dst", str(dst), "--shard-mb", str(args.shard_mb)]
    if args.llm_layers:
        command += ["--llm-layers", str(args.llm_layers)]
    env = dict(os.environ)
    if code is not None:  # an older checkout of the package shadows the installed one
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"{step} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _checkout(ref: str, into: Path) -> Path:
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "megatron_internvl"],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="internvl2_5_1b")
    parser.add_argument("--llm-layers", type=int, help="fewer LLM layers (real widths)")
    parser.add_argument("--shard-mb", type=int, default=512, help="HF shard size, both ways")
    parser.add_argument("--old", metavar="REF", help="also run the converter of this git revision")
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
        versions = [("new", None)]
        if args.old:
            versions.append((f"old ({args.old})", _checkout(args.old, root / "old_code")))
        rows = []
        for version, code in versions:
            tag = "old" if code else "new"
            for step, src, dst in (
                ("to-megatron", "hf", f"mg_{tag}"),
                ("to-hf", f"mg_{tag}", f"back_{tag}"),
            ):
                print(f"{version}: {step} ...", flush=True)
                result = _run(args, step, root / src, root / dst, code)
                rows.append((version, step, result))
            exact = _same_tensors(root / "hf", root / f"back_{tag}")
            print(f"{version}: HF -> Megatron -> HF bit-exact: {exact}", flush=True)
            if not exact:
                return 1
        largest, total = sizes["largest_shard"], sizes["total"]
        print(
            f"\n{args.spec.name}: model {total / GiB:.2f} GiB in {sizes['shards']} HF shards, "
            f"largest shard {largest / GiB:.2f} GiB"
        )
        head = ("code", "step", "peak RSS", "baseline", "peak-base", "/largest", "writers", "time")
        print(f"{head[0]:<12} {head[1]:<12}" + "".join(f"{h:>10}" for h in head[2:]))
        for version, step, r in rows:
            peak, base = r["peak_rss"], r["baseline_rss"]
            print(
                f"{version:<12} {step:<12}{peak / GiB:>8.2f}Gi{base / GiB:>8.2f}Gi"
                f"{(peak - base) / GiB:>8.2f}Gi{(peak - base) / largest:>9.2f}x"
                f"{r['writer_peak_rss'] / GiB:>8.2f}Gi{r['seconds']:>9.1f}s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
