"""What the local launcher (`python -m megatron_internvl.launch.local`, torchrun on loopback)
prints when ranks fail, through the training entry on two ranks: a data mistake is the ranks'
one `error:` line and exit code 2, nothing of torchrun's; a crash keeps torchrun's failure
report with the lowest failing rank's traceback; a `checkpoint.pretrained` that names no
Megatron checkpoint is a user error too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CRASH_ON_RANK_1 = """
import os, sys, time
from megatron_internvl.training import loop

def crash(cfg):
    if os.environ["RANK"] == "1":
        raise RuntimeError("injected crash on rank 1")
    time.sleep(120)  # rank 0 is still at work when rank 1 fails

loop.train = crash
from megatron_internvl.train import main
sys.exit(main())
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("launch") / "shards"
    subprocess.run(
        [sys.executable, "tools/build_shards.py", "--demo", "--out", str(out), "--no-progress"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return out


def _launch(program: list[str], out: Path, shards: Path) -> subprocess.CompletedProcess:
    command = [
        *(sys.executable, "-m", "megatron_internvl.launch.local"),
        *("--standalone", "--nproc-per-node", "2", *program),
        "recipe=demo_cpu_shards",
        f"output_dir={out}",
        f"data.shards=[{shards}]",
        f"data.tokenizer={ROOT / 'demo' / 'tokenizer'}",
        *("parallel.tensor=1", "parallel.sequence_parallel=false"),
        *("train.steps=2", "train.warmup_steps=1", "model.vit_layers=1", "model.num_layers=1"),
    ]
    # OMP_NUM_THREADS set: torchrun's start-up notice about it is not what is tested here.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_a_data_mistake_is_one_line_and_exit_code_2(shards, tmp_path):
    missing = tmp_path / "no_such_dir"
    result = _launch(["-m", "megatron_internvl.train"], tmp_path / "runs", missing)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [f"error: data.shards: no such directory {missing}"]
    assert result.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_a_crash_keeps_the_lowest_failing_ranks_traceback(shards, tmp_path):
    script = tmp_path / "crash_on_rank_1.py"
    script.write_text(CRASH_ON_RANK_1)
    result = _launch([str(script)], tmp_path / "runs", shards)
    assert result.returncode not in (0, 2)
    assert "ChildFailedError" in result.stderr
    # torchrun's report names rank 1 as the root cause, with the traceback from its error file.
    root_cause = result.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause
    assert "Traceback (most recent call last):" in root_cause
    assert "RuntimeError: injected crash on rank 1" in root_cause


def test_a_pretrained_path_that_is_no_checkpoint_is_a_user_error(tmp_path):
    from megatron_internvl.checkpoint.distributed import CheckpointError, load_model_only
    from megatron_internvl.config.cli import is_user_error

    with pytest.raises(CheckpointError, match="no such directory") as missing:
        load_model_only(tmp_path / "nope", [])
    assert is_user_error(missing.value)  # one `error:` line and exit code 2 at the entry
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")  # an HF checkpoint, not converted
    with pytest.raises(CheckpointError, match=r"no Megatron checkpoint in .*to-megatron"):
        load_model_only(tmp_path / "hf", [])
