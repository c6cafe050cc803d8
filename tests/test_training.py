"""The training loop on 2 CPU ranks: signals save and exit for requeue, resume is bit-exact,
an interrupted save is never loaded, and TensorBoard's own reader sees the logged scalars."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_internvl.checkpoint.distributed import COMMIT_MARKER, committed_steps
from megatron_internvl.training.signals import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def _command(out: Path, name: str, *extra: str) -> list[str]:
    torchrun = [sys.executable, "-m", "megatron_internvl.launch.local"]  # torchrun on loopback only
    return [
        *torchrun,
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "megatron_internvl.train",
        "recipe=demo_cpu",
        f"name={name}",
        f"output_dir={out}",
        f"train.steps={STEPS}",
        "logging.log_every=1",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}


def _run(out: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(out, name, *extra),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _losses(out: Path, name: str) -> dict[int, float]:
    events = EventAccumulator(str(out / name / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    out = tmp_path_factory.mktemp("runs")
    result = _run(out, "straight", "checkpoint.save_every=4", "checkpoint.keep_last=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, _losses(out, "straight")


def test_tensorboard_holds_every_metric_and_the_loss_falls(uninterrupted):
    out, losses = uninterrupted
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < 0.9 * losses[1]
    events = EventAccumulator(str(out / "straight" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/lr",
        "train/grad_norm",
        "train/skipped_steps",
        "throughput/samples_per_s",
        "throughput/tokens_per_s",
        "throughput/model_tflops_per_gpu",
        "memory/gb",
    } <= tags
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert max(lrs) == pytest.approx(3e-3) and lrs[-1] == pytest.approx(3e-4)  # warm-up, cosine
    assert (out / "straight" / "config.json").is_file()
    assert committed_steps(out / "straight" / "checkpoints") == [8, 12]  # keep_last=2


def test_signal_saves_exits_for_requeue_and_resume_is_bit_exact(uninterrupted, tmp_path):
    _, expected = uninterrupted
    proc = subprocess.Popen(
        _command(tmp_path, "preempted"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:  # wait until training is under way, then preempt one rank
        lines.append(line)
        if line.startswith("step      4 |"):
            workers = psutil.Process(proc.pid).children(recursive=True)
            os.kill(workers[-1].pid, signal.SIGUSR1)
            break
    lines.extend(proc.stdout)
    proc.wait(timeout=300)
    log = "".join(lines)
    assert f"exiting with {REQUEUE_EXIT_CODE} (requeue)" in log, log[-3000:]
    saved = committed_steps(tmp_path / "preempted" / "checkpoints")
    assert len(saved) == 1 and 4 <= saved[0] < STEPS

    resumed = _run(tmp_path, "preempted")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at step {saved[0]}" in resumed.stdout, resumed.stdout
    assert _losses(tmp_path, "preempted") == expected  # every step, bit for bit


def test_an_interrupted_save_is_ignored_and_replaced(uninterrupted, tmp_path):
    out, expected = uninterrupted
    shutil.copytree(out / "straight" / "checkpoints", tmp_path / "killed" / "checkpoints")
    last = tmp_path / "killed" / "checkpoints" / f"step_{STEPS:08d}"
    (last / COMMIT_MARKER).unlink()  # killed before the marker: the save never happened
    (last / "meta.json").write_text("{ truncated")
    result = _run(tmp_path, "killed", "checkpoint.save_every=4", "checkpoint.keep_last=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "at step 8" in result.stdout
    resumed = _losses(tmp_path, "killed")
    assert resumed == {s: expected[s] for s in range(9, STEPS + 1)}
    assert committed_steps(tmp_path / "killed" / "checkpoints") == [8, 12]


def _nan_on_rank_one() -> list[bool]:
    import torch
    import torch.distributed as dist

    from megatron_internvl.training.step import all_finite as _all_finite

    param = torch.nn.Parameter(torch.zeros(3))
    param.main_grad = torch.ones(3)
    if dist.get_rank() == 1:
        param.main_grad[1] = float("nan")
    chunk = torch.nn.Module()
    chunk.p = param
    nan_grad_on_one_rank = _all_finite([chunk], 2.5)
    param.main_grad.fill_(1.0)
    all_finite = _all_finite([chunk], 2.5)
    inf_loss_on_one_rank = _all_finite([chunk], float("inf") if dist.get_rank() == 0 else 2.5)
    return [nan_grad_on_one_rank, all_finite, inf_loss_on_one_rank]


def test_a_nan_on_one_rank_is_agreed_by_all():
    from tests.harness import run_on_ranks

    assert run_on_ranks(_nan_on_rank_one, 2) == [[False, True, False]] * 2


def test_async_saves_commit_and_resume_bit_exactly(uninterrupted, tmp_path):
    _, expected = uninterrupted
    flags = ("checkpoint.save_every=4", "checkpoint.keep_last=2", "checkpoint.async_save=true")
    result = _run(tmp_path, "async", *flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "writing in the background" in result.stdout
    assert _losses(tmp_path, "async") == expected  # saving in the background changes nothing
    root = tmp_path / "async" / "checkpoints"
    assert committed_steps(root) == [8, 12]
    (root / f"step_{STEPS:08d}" / COMMIT_MARKER).unlink()
    shutil.rmtree(tmp_path / "async" / "tensorboard")
    resumed = _run(tmp_path, "async", *flags)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "at step 8" in resumed.stdout
    assert _losses(tmp_path, "async") == {s: expected[s] for s in range(9, STEPS + 1)}


def test_stage1_starts_from_converted_weights_and_trains_only_the_projector(tmp_path):
    from tests.convert_cases import load_dir, make_native

    make_native("tiny_qwen_300m_style", tmp_path / "hf")
    convert = [sys.executable, "tools/convert_hf.py"]
    env = _env()
    subprocess.run(
        [
            *convert,
            "to-megatron",
            "--hf-dir",
            str(tmp_path / "hf"),
            "--model",
            "tiny_qwen_300m_style",
            "--out",
            str(tmp_path / "mg"),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = _run(
        tmp_path,
        "stage1",
        "train.stage=1",
        f"checkpoint.pretrained={tmp_path / 'mg'}",
        "train.steps=6",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    subprocess.run(
        [
            *convert,
            "to-hf",
            "--ckpt",
            str(tmp_path / "stage1" / "checkpoints"),
            "--out",
            str(tmp_path / "export"),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    before, after = load_dir(tmp_path / "hf"), load_dir(tmp_path / "export")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("multi_modal_projector" in k for k in changed), sorted(changed)[:5]


def test_bf16_training_runs_and_learns(tmp_path):
    result = _run(tmp_path, "bf16", "model.dtype=bfloat16", "train.steps=8")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = _losses(tmp_path, "bf16")
    assert losses[8] < losses[1] - 0.3
    assert "Overwriting old incomplete" not in result.stdout + result.stderr
