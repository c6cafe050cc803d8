"""Hostile and damaged checkpoints through the real entry points (2 CPU ranks, demo recipe).

A real 4-step run saves steps 2 and 4. Then:
- a `__reduce__` payload (it would create a marker file) planted in each pickle-bearing file of
  step 4 (`.metadata`, the BYTE_IO items of the `.distcp` files, `common.pt`, `rank_*.pt`) is
  refused, naming the file, at resume, at `checkpoint.pretrained` and by `convert_hf.py to-hf`;
  `to-megatron` reads no pickle at all (a planted `pytorch_model.bin` is refused); the marker
  file never appears;
- a truncated `.distcp`, a missing `.metadata`, a flipped byte and an edited `meta.json` step
  in step 4 are reported and training resumes from step 2, with the same losses as the first
  run, keeping the damaged checkpoint aside; with `checkpoint.verify=false` a flipped byte in
  tensor data is not noticed (the option does skip the check).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from megatron_internvl.checkpoint.distributed import committed_steps, prune, step_dir

ROOT = Path(__file__).resolve().parents[1]
BASE = ("recipe=demo_cpu", "train.warmup_steps=1", "logging.log_every=1")


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    torchrun = [sys.executable, "-m", "megatron_internvl.launch.local", "--standalone"]
    command = [*torchrun, "--nproc-per-node", "2", "-m", "megatron_internvl.train"]
    return subprocess.run(
        [*command, *BASE, f"output_dir={out}", *extra],
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _losses(run: Path) -> dict[int, float]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    out = tmp_path_factory.mktemp("first")
    result = _train(out, "name=run", "train.steps=4", "checkpoint.save_every=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert committed_steps(out / "run" / "checkpoints") == [2, 4]
    return out / "run", _losses(out / "run")


def _copy(first_run, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(first_run[0], run)
    return run


# --- payloads ------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_metadata(ckpt: Path, marker: Path) -> None:
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())
    metadata.planner_data = {"payload": _Payload(marker)}
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))


def _plant_byte_items(ckpt: Path, marker: Path) -> int:
    """Every BYTE_IO item now points at a payload appended to its .distcp file (the .metadata
    itself stays genuine)."""
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())
    planted = 0
    for index, info in list(metadata.storage_data.items()):
        if not isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata):
            continue
        data = io.BytesIO()
        torch.save([_Payload(marker)], data)
        with open(ckpt / info.relative_path, "ab") as handle:
            offset = handle.tell()
            handle.write(data.getvalue())
        info.offset, info.length = offset, len(data.getvalue())
        planted += 1
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    return planted


def _plant_torch_file(path: Path, marker: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["payload"] = _Payload(marker)
    torch.save(state, path)


def _plant(ckpt: Path, where: str, marker: Path) -> str:
    """Plant a payload in `where`; returns the file name the refusal must name."""
    if where == ".metadata":
        _plant_metadata(ckpt, marker)
        return ".metadata"
    if where == "byte-io":
        assert _plant_byte_items(ckpt, marker) > 0
        return ".distcp"
    if where == "common.pt":
        _plant_torch_file(ckpt / "common.pt", marker)
        return "common.pt"
    for rank_file in ckpt.glob("rank_*.pt"):
        _plant_torch_file(rank_file, marker)
    return "rank_0000"


@pytest.mark.parametrize("where", [".metadata", "byte-io", "common.pt", "rank.pt"])
def test_resume_refuses_a_planted_payload(first_run, tmp_path, where):
    run, marker = _copy(first_run, tmp_path), tmp_path / "PWNED"
    named = _plant(step_dir(run / "checkpoints", 4), where, marker)
    # verify=false: the checksums would catch the edit first; this proves the unpickler does.
    result = _train(tmp_path, "name=run", "train.steps=6", "checkpoint.verify=false")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]  # one `error:` line, no traceback
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "refused to load" in line and named in line, output[-3000:]
    assert "Traceback" not in output
    assert "resumed from" not in output
    assert not marker.exists()


@pytest.mark.parametrize("where", [".metadata", "byte-io", "common.pt"])
def test_pretrained_start_refuses_a_planted_payload(first_run, tmp_path, where):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "PWNED"
    shutil.copytree(step_dir(first_run[0] / "checkpoints", 4), ckpt)
    named = _plant(ckpt, where, marker)
    result = _train(tmp_path, "name=fresh", "train.steps=2", f"checkpoint.pretrained={ckpt}")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "refused to load" in output and named in output, output[-3000:]
    assert not marker.exists()


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tools/convert_hf.py", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_conversions_refuse_planted_payloads(first_run, tmp_path):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "PWNED"
    shutil.copytree(step_dir(first_run[0] / "checkpoints", 4), ckpt)
    _plant(ckpt, ".metadata", marker)
    to_hf = _convert("to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"))
    assert to_hf.returncode != 0
    assert "refused to load" in to_hf.stderr and ".metadata" in to_hf.stderr, to_hf.stderr
    assert "Traceback" not in to_hf.stderr

    hf_dir = tmp_path / "hf_in"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"]}))
    torch.save({"weight": _Payload(marker)}, hf_dir / "pytorch_model.bin")
    flavour = ("--model", "tiny_qwen_300m_style")
    to_megatron = _convert("to-megatron", "--hf-dir", str(hf_dir), *flavour, "--out", str(tmp_path))
    assert to_megatron.returncode != 0
    assert "pytorch_model.bin" in to_megatron.stderr, to_megatron.stderr
    assert not marker.exists()


# --- damage --------------------------------------------------------------------------------


def _truncate(ckpt: Path) -> str:
    target = sorted(ckpt.glob("*.distcp"))[-1]
    with open(target, "r+b") as handle:
        handle.truncate(target.stat().st_size // 2)
    return f"{target.name} has"


def _drop_metadata(ckpt: Path) -> str:
    (ckpt / ".metadata").unlink()
    return ".metadata is missing"


def _flip_byte(ckpt: Path) -> str:
    target = sorted(ckpt.glob("*.distcp"))[0]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # in the middle of tensor data
    target.write_bytes(bytes(data))
    return f"{target.name} does not match its recorded checksum"


def _edit_meta_step(ckpt: Path) -> str:
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["step"] = 99
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return "meta.json says step 99, the directory is step 4"


@pytest.mark.parametrize(
    ("damage", "verify"),
    [
        (_truncate, "true"),
        (_drop_metadata, "true"),
        (_flip_byte, "true"),
        (_edit_meta_step, "false"),  # the step check itself, not the checksum, catches it
        (_truncate, "false"),  # loading fails: reported, the previous one is used
    ],
)
def test_damaged_latest_checkpoint_falls_back_to_the_previous(first_run, tmp_path, damage, verify):
    run = _copy(first_run, tmp_path)
    reason = damage(step_dir(run / "checkpoints", 4))
    result = _train(
        tmp_path,
        "name=run",
        "train.steps=6",
        "checkpoint.save_every=2",
        "checkpoint.keep_last=3",
        f"checkpoint.verify={verify}",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "step_00000004 is unusable" in output, output[-3000:]
    if verify == "true" or damage is _edit_meta_step:
        assert reason in output, output[-3000:]
    else:
        assert "loading failed" in output, output[-3000:]
    assert f"resumed from {step_dir(run / 'checkpoints', 2)} at step 2" in output
    losses = _losses(run)
    assert {s: losses[s] for s in (3, 4)} == {s: first_run[1][s] for s in (3, 4)}
    assert (run / "checkpoints" / "step_00000004.replaced-1").is_dir()  # kept, not deleted
    assert committed_steps(run / "checkpoints") == [2, 4, 6]


def test_skipping_verification_loads_a_flipped_byte_unnoticed(first_run, tmp_path):
    run = _copy(first_run, tmp_path)
    _flip_byte(step_dir(run / "checkpoints", 4))
    result = _train(tmp_path, "name=run", "train.steps=5", "checkpoint.verify=false")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "resumed from" in output and "step_00000004 at step 4" in output, output[-3000:]


def test_keep_last_never_deletes_a_newer_checkpoint(tmp_path):
    for step in (2, 4, 6, 8):
        step_dir(tmp_path, step).mkdir()
        (step_dir(tmp_path, step) / "COMMITTED").write_text(f"{step}\n")
    assert prune(tmp_path, 4, keep_last=1) == [2]
    assert committed_steps(tmp_path) == [4, 6, 8]
    assert prune(tmp_path, 8, keep_last=2) == [4]
    assert committed_steps(tmp_path) == [6, 8]
