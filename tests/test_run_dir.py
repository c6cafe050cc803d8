"""A run directory belongs to one run, through the training entry on the demo shards: a fresh
start or another model into it is refused in one line and writes nothing, a finished run says
so and exits 0, a moved shard folder still resumes, a changed one is refused naming the change,
`checkpoint.overwrite=true` moves the old run aside and starts anew; a checkpoint that fails its
checksums on resume is one line too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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
    assert result.returncode == 2
    (line,) = _error_lines(result)
    run = out / "demo_cpu_shards"
    assert str(run) in line and "latest step 2" in line
    assert "checkpoint.resume=true" in line and "output_dir=" in line
    assert "checkpoint.overwrite=true" in line
    assert "Traceback" not in result.stderr  # neither ours nor torchrun's
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
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = _error_lines(result)
    assert f"no such directory {tmp_path / 'no_such_dir'}" in line
    assert not (tmp_path / "runs").exists()


def _losses(run: Path) -> dict[int, float]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def test_overwrite_moves_the_old_run_aside_and_starts_anew(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    run = out / "demo_cpu_shards"
    old = _files(run)
    result = _train(out, finished_run[1], "train.steps=3", "checkpoint.overwrite=true")
    assert result.returncode == 0, result.stderr[-3000:]
    (aside,) = out.glob("demo_cpu_shards.replaced-*")
    assert f"moved the previous run {run} to {aside}" in result.stdout
    assert _files(aside) == old  # every file of the old run, untouched, at its new place
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_00000002"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003"]
    assert (run / "run.json").is_file() and "resumed from" not in result.stdout
    assert sorted(_losses(run)) == [1, 2, 3]  # the new run's TensorBoard: its own steps only
    assert sorted(_losses(aside)) == [1, 2]


def test_a_checkpoint_failing_its_checksums_is_one_line(finished_run, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    step = out / "demo_cpu_shards" / "checkpoints" / "step_00000002"
    with (step / "common.pt").open("r+b") as damaged:  # a bit flipped on disk
        byte = damaged.read(1)
        damaged.seek(0)
        damaged.write(bytes([byte[0] ^ 1]))
    result = _train(out, finished_run[1], "train.steps=3")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = _error_lines(result)
    assert f"no committed checkpoint in {step.parent} can be loaded" in line
    assert "common.pt" in line
    assert "Traceback" not in result.stderr
