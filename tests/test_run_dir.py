"""A run directory belongs to one run, through the training entry on the demo shards: a fresh
start or another model into it is refused in one line and writes nothing, a finished run says
so and exits 0, a moved shard folder still resumes, a changed one is refused naming the change."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train(out: Path, shards: Path, *extra: str) -> subprocess.CompletedProcess:
    torchrun = [sys.executable, "-m", "megatron_internvl.launch.local"]  # torchrun on loopback only
    command = [
        *torchrun,
        "--standalone",
        "--nproc-per-node",
        "1",
        "-m",
        "megatron_internvl.train",
        "recipe=demo_cpu_shards",
        f"output_dir={out}",
        f"data.shards=[{shards}]",
        f"data.tokenizer={ROOT / 'demo' / 'tokenizer'}",
        "parallel.tensor=1",
        "parallel.sequence_parallel=false",
        "train.warmup_steps=1",
        "logging.log_every=1",
        "model.vit_layers=1",
        "model.num_layers=1",
        *extra,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-step run on the demo shards (its output_dir, its shard folder)."""
    base = tmp_path_factory.mktemp("run_dir")
    shards = base / "shards"
    subprocess.run(
        [sys.executable, "tools/build_shards.py", "--demo", "--out", str(shards), "--no-progress"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    result = _train(base / "runs", shards, "train.steps=2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return base / "runs", shards


def _copy_run(finished_run, tmp_path: Path) -> Path:
    out, _ = finished_run
    shutil.copytree(out, tmp_path / "runs")
    return tmp_path / "runs"


def test_a_finished_run_says_so_and_writes_nothing(finished_run):
    out, shards = finished_run
    before = _files(out)
    result = _train(out, shards, "train.steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already reached step 2 (train.steps=2)" in result.stdout
    assert _files(out) == before


def test_a_fresh_start_into_a_run_with_checkpoints_is_refused(finished_run):
    out, shards = finished_run
    before = _files(out)
    result = _train(out, shards, "train.steps=4", "checkpoint.resume=false")
    assert result.returncode != 0
    (line,) = _error_lines(result)
    run = out / "demo_cpu_shards"
    assert str(run) in line and "latest step 2" in line
    assert "checkpoint.resume=true" in line and "output_dir=" in line
    # No frame of ours: torchrun adds its own traceback, through our loopback wrapper only.
    frames = re.findall(r'File "([^"]+)"', result.stderr)
    assert not [f for f in frames if "megatron_internvl/" in f and "launch/local.py" not in f]
    assert _files(out) == before  # no config.json, TensorBoard or checkpoint written


def test_resuming_another_model_names_both_and_writes_nothing(finished_run):
    out, shards = finished_run
    before = _files(out)
    result = _train(out, shards, "train.steps=4", "model.flavour=tiny_internlm_6b_style")
    assert result.returncode != 0
    (line,) = _error_lines(result)
    assert "tiny_qwen_300m_style" in line and "tiny_internlm_6b_style" in line
    assert _files(out) == before


def test_a_moved_shard_folder_still_resumes(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    moved = shutil.copytree(finished_run[1], tmp_path / "elsewhere" / "demo")
    result = _train(out, moved, "train.steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 2" in result.stdout and "step      3 | loss" in result.stdout


def test_a_changed_dataset_is_refused_naming_the_change(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    changed = shutil.copytree(finished_run[1], tmp_path / "changed")
    for suffix in (".tar", ".idx"):
        shutil.copy(changed / f"shard-000000{suffix}", changed / f"shard-000001{suffix}")
    result = _train(out, changed, "train.steps=3")
    assert result.returncode != 0
    (line,) = _error_lines(result)
    assert "data.shards[0] changed" in line and "shard-000001.tar" in line


def test_a_missing_shard_folder_is_named(finished_run, tmp_path):
    result = _train(tmp_path / "runs", tmp_path / "no_such_dir", "train.steps=2")
    assert result.returncode != 0
    (line,) = _error_lines(result)
    assert f"no such directory {tmp_path / 'no_such_dir'}" in line
    assert not (tmp_path / "runs").exists()
