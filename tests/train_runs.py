"""`train()` on the bundled demo shards, several runs per spawn of gloo ranks.

Spawning ranks costs seconds (Megatron-Core imports), so one spawn runs every `Run` of one
layout one after the other (`train()` leaves a world it did not create standing). Per-step
losses and the validation loss are read back with TensorBoard's own event reader.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
BUILD_SHARDS = (sys.executable, "tools/build_shards.py", "--demo")


@dataclass(frozen=True)
class Run:
    name: str
    overrides: tuple[str, ...] = ()
    dealt_over: int | None = None
    """One rank reads the micro-batches data-parallel ranks 0..n-1 of n would (a DP reference)."""
    resume_from: tuple[str, int] | None = None
    """(run name, step): start from a copy of that run's checkpoint of that step."""
    nan_grad_at: int | None = None
    """Put a NaN into rank 1's gradient buffer after this step's backward pass."""


@dataclass
class Curves:
    losses: dict[int, float] = field(default_factory=dict)
    valid: dict[int, float] = field(default_factory=dict)


def build_demo_split(out: Path) -> dict[str, list[str]]:
    """The demo shards in 4 files: 3 to train on, the last one held out."""
    subprocess.run(
        [*BUILD_SHARDS, "--out", str(out), "--no-progress", "--max-samples", "8"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    shards = sorted(str(p) for p in out.glob("*.tar"))
    return {"train": shards[:-1], "valid": shards[-1:]}


INIT = Run(
    "init",
    ("checkpoint.pretrained=null", "train.lr=0", "train.min_lr=0", "train.steps=2"),
)
"""Writes the initial weights (lr 0): every other run starts from them, as Megatron's
initialization depends on the layout (per-stage seeds)."""


def base_overrides(split: dict[str, list[str]], out: Path) -> list[str]:
    init = out / INIT.name / "checkpoints" / "step_00000002"
    return [
        f"checkpoint.pretrained={init}",
        "recipe=demo_cpu_shards",
        f"output_dir={out}",
        "parallel.tensor=1",
        "parallel.sequence_parallel=false",
        "parallel.gpus=null",
        f"train.steps={STEPS}",
        "train.warmup_steps=1",
        "train.global_batch=2",
        "logging.log_every=1",
        "checkpoint.save_every=0",
        "data.pad_to_multiple=4",  # what CP2 needs: the same rows at every layout
        f"data.shards=[{','.join(split['train'])}]",
        f"data.valid_shards=[{','.join(split['valid'])}]",
    ]


class _Dealt:
    """Micro-batches of data-parallel ranks 0..n-1, in rank order, from one process."""

    def __init__(self, sources: list) -> None:
        self.sources = sources

    def next_microbatches(self, count: int) -> list:
        per_rank = count // len(self.sources)
        return [b for source in self.sources for b in source.next_microbatches(per_rank)]

    def state_dict(self) -> dict:
        return {"ranks": [s.state_dict() for s in self.sources]}


def run_all(base: list[str], runs: list[Run]) -> None:
    """On every rank: `train()` each run in turn (module level, for the spawn harness)."""
    import torch.distributed as dist

    from megatron_internvl.config.schema import load_run_config
    from megatron_internvl.train import compose
    from megatron_internvl.training import loop

    for run in runs:
        cfg = load_run_config(compose([*base, f"name={run.name}", *run.overrides]))
        if run.resume_from is not None and dist.get_rank() == 0:
            _copy_checkpoint(Path(cfg.output_dir), run.resume_from, run.name)
        dist.barrier()
        original = loop.data_source, loop.forward_backward
        if run.dealt_over:
            loop.data_source = _dealt_source(original[0], run.dealt_over)
        if run.nan_grad_at:
            loop.forward_backward = _nan_on_rank_one(original[1], run.nan_grad_at)
        try:
            assert loop.train(cfg) == 0
        finally:
            loop.data_source, loop.forward_backward = original


def _dealt_source(original, dp_size: int):
    def source(cfg, spec, _dp_rank, _dp_size, tokenizer=None):
        return _Dealt([original(cfg, spec, r, dp_size, tokenizer) for r in range(dp_size)])

    return source


def _nan_on_rank_one(forward_backward, at_step: int):
    import torch.distributed as dist

    calls = [0]

    def patched(forward_step, data_iterator, model, **kwargs):
        loss = forward_backward(forward_step, data_iterator, model, **kwargs)
        calls[0] += 1
        if calls[0] == at_step and dist.get_rank() == 1:
            model[0].buffers[0].grad_data[-1] = float("nan")
        return loss

    return patched


def _copy_checkpoint(out: Path, source: tuple[str, int], name: str) -> None:
    from megatron_internvl.checkpoint.distributed import step_dir

    name_of_step = step_dir(".", source[1]).name
    target = out / name / "checkpoints" / name_of_step
    shutil.copytree(out / source[0] / "checkpoints" / name_of_step, target)


def scalars(out: Path, name: str, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(out / name / "tensorboard"))
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in events.Scalars(tag)}


def curves(out: Path, name: str) -> Curves:
    return Curves(scalars(out, name, "train/loss"), scalars(out, name, "valid/loss"))
