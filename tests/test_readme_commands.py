"""Every command in the README's code blocks works as written: each one either runs here on CPU
(dry-runs included) from a fresh working directory, or names the test that covers it or why it
cannot run here. A new README command that is in neither list fails the test."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BUILD_DEMO = "python tools/build_shards.py --demo --out runs/demo_shards"
LAYOUTS = ("mixed", "caption", "video")  # data_throughput's shard layouts
RUN_HERE = {  # README command -> mark (None: must pass)
    BUILD_DEMO: None,
    "python tools/validate_shards.py shards/ [--clean-dir clean/] [--fix-index]": None,
    "python -m megatron_internvl.train --help": None,
    "python -m megatron_internvl.train recipe=internvl2_5_78b_stage2 --cfg job": None,
    "python -m megatron_internvl.launch recipe=internvl2_5_78b_stage2 cluster=h100_pyxis "
    "cluster.nodes=128 cluster.container_image=registry.example.com/lab/megatron-internvl:latest "
    "data.shards=[/data/shards] data.tokenizer=/models/InternVL2_5-78B --dry-run": None,
    "python tools/sweep.py plan isoflop": None,
    "python tools/sweep.py launch isoflop --dry-run": None,
    "python tools/plan.py --model internvl2_5_78b --gpus 1024 --gpu-memory-gb 80 "
    "[--seq-length N] [--future]": None,
    **{f"python benchmarks/data_throughput.py --layout {layout}": None for layout in LAYOUTS},
}
COVERED_ELSEWHERE = {
    "scripts/demo.sh": "tests/test_demo.py",
    "scripts/test.sh": "the suite itself",
    "python tools/build_shards.py --json train.jsonl --image-root images/ --out shards/ "
    "--max-samples 1000": "the user's own data; tests/test_data_shards.py",
    "python tools/convert_hf.py to-megatron --hf-dir /models/InternVL2_5-8B --model "
    "internvl2_5_8b --out ckpt/internvl2_5_8b --vision-pad-heads-to 8": "a released checkpoint; "
    "tests/test_export_ready.py converts the demo export back",
    "python tools/convert_hf.py to-hf --ckpt runs/my_run/checkpoints --out export/ --layout "
    "native": "tests/test_demo.py, tests/test_export_ready.py",
    "torchrun --nproc-per-node 8 -m megatron_internvl.train recipe=internvl2_5_8b_stage2 "
    "data.shards=[/data/shards] data.tokenizer=/models/InternVL2_5-8B "
    "checkpoint.pretrained=ckpt/internvl2_5_8b": "8 GPUs; its config is checked by --cfg job below",
    "pip install -e .[gpu]": "GPU hosts",
    "pip install nvidia-dali-cuda130": "already a dependency",
    "python -m megatron_internvl.launch recipe=internvl2_5_78b_stage2 cluster=h100_pyxis "
    "cluster.nodes=128 cluster.container_image=registry.example.com/lab/megatron-internvl:latest "
    "data.shards=[/data/shards] data.tokenizer=/models/InternVL2_5-78B": (
        "sbatch; tests/test_slurm.py"
    ),
    "python tools/build_shards.py --img2dataset laion_files/ --out shards/": (
        "the user's img2dataset folder; tests/test_data_layouts.py builds one and runs this CLI"
    ),
    "python -m megatron_internvl.sweeps.corpus --out runs/sweep_corpus": "feeds cpu_scaling",
    "python tools/sweep.py run cpu_scaling": "a 12-point sweep of minutes to tens of minutes on "
    "2 cores; the fit and report code it runs: tests/test_sweep_fit.py, tests/test_sweep_cpu.py",
    "python tools/sweep.py run cpu_synthetic": "as cpu_scaling",
    "python tools/sweep.py run cpu_joint": "a 12-point sweep of ~7 minutes on 2 cores; its fit's "
    "non-identifiable vision term: tests/test_sweep_fit.py",
    "python tools/sweep.py run cpu_mini": "tests/test_sweep_cpu.py",
    "python tools/sweep.py status cpu_mini": "after `run cpu_mini`; tests/test_sweep_cpu.py",
    "python tools/sweep.py launch cpu_mini --only C4e10-vit2x32_llm2x64": "tests/test_sweep_cpu.py",
    "python tools/sweep.py report cpu_mini": "tests/test_sweep_cpu.py",
}
# How a runnable command with placeholders is run here (the demo shards stand in for shards/).
AS_RUN = {
    "python tools/validate_shards.py shards/ [--clean-dir clean/] [--fix-index]": (
        "python tools/validate_shards.py runs/demo_shards"
    ),
    "python tools/plan.py --model internvl2_5_78b --gpus 1024 --gpu-memory-gb 80 "
    "[--seq-length N] [--future]": (
        "python tools/plan.py --model internvl2_5_78b --gpus 1024 --gpu-memory-gb 80 --future"
    ),
    **{  # a benchmark of minutes, run here on a few samples
        f"python benchmarks/data_throughput.py --layout {layout}": (
            f"python benchmarks/data_throughput.py --layout {layout} --samples 16 --repeats 1"
        )
        for layout in LAYOUTS
    },
}


def readme_commands() -> list[str]:
    """Commands of the README's bash blocks: continuations joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = " ".join(line.split("  #")[0].split())
            if command and not command.startswith("#") and command not in commands:
                commands.append(command)
    return commands


def test_every_readme_command_is_run_or_covered():
    unknown = [c for c in readme_commands() if c not in RUN_HERE and c not in COVERED_ELSEWHERE]
    assert not unknown, f"README commands this test neither runs nor knows: {unknown}"
    stale = [c for c in [*RUN_HERE, *COVERED_ELSEWHERE] if c not in readme_commands()]
    assert not stale, f"no longer in the README: {stale}"


@pytest.fixture(scope="module")
def fresh_checkout(tmp_path_factory) -> Path:
    """A working directory that looks like the repository root, writing only under tmp."""
    work = tmp_path_factory.mktemp("readme")
    for name in ("tools", "benchmarks", "demo", "recipes", "slurm", "scripts", "megatron_internvl"):
        (work / name).symlink_to(ROOT / name)
    return work


def _python(command: str) -> list[str]:
    argv = shlex.split(command)
    return [sys.executable, *argv[1:]] if argv[0] == "python" else argv


@pytest.mark.parametrize(
    "command", [pytest.param(c, marks=m or (), id=c[:60]) for c, m in RUN_HERE.items()]
)
def test_readme_command_runs(fresh_checkout, command):
    if "validate_shards" in command and not (fresh_checkout / "runs" / "demo_shards").is_dir():
        test_readme_command_runs(
            fresh_checkout, "python tools/build_shards.py --demo --out runs/demo_shards"
        )
    result = subprocess.run(
        _python(AS_RUN.get(command, command)),
        cwd=fresh_checkout,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
