"""The training loop: model + data + optimizer + checkpoints + signals + logging.

One call of `train(cfg)` per rank (torchrun or srun started the ranks). Every decision that one
rank could see differently (a NaN, a signal) is all-reduced before anyone acts. What a run is
built from lives in `build_model`, `build_optimizer` and `build_data`; one optimizer step is
`training.step`; the held-out loss is `training.validation`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.timers import Timers

from megatron_internvl.checkpoint import distributed as ckpt
from megatron_internvl.config.schema import RunConfig
from megatron_internvl.config.validate import layout_notes, validate
from megatron_internvl.models.registry import InternVLSpec
from megatron_internvl.parallel import runtime
from megatron_internvl.parallel.layout import ParallelLayout
from megatron_internvl.training.build_data import (  # noqa: F401 (public names of the loop)
    ShardSource,
    data_source,
    fit_spec_to_tokenizer,
    load_tokenizer,
    validation_loader,
)
from megatron_internvl.training.build_model import (  # noqa: F401 (public names of the loop)
    build_model,
    recompute_overrides,
    resolved_spec,
)
from megatron_internvl.training.build_optimizer import build_optimizer, build_scheduler
from megatron_internvl.training.flops import training_flops
from megatron_internvl.training.lost_steps import lost_steps_note
from megatron_internvl.training.metrics import MetricsLogger
from megatron_internvl.training.run_dir import claim_run_dir
from megatron_internvl.training.signals import (
    REQUEUE_EXIT_CODE,
    REQUEUE_FILE_ENV,
    SignalWatcher,
)
from megatron_internvl.training.step import all_finite, forward_backward, internvl_forward_step
from megatron_internvl.training.validation import ValidationSet

TIMERS = ("data-wait", "forward-backward", "optimizer")
"""Where a step's time goes (Megatron-Core's Timers), printed every log interval."""


class NonFiniteError(RuntimeError):
    """The loss or gradients became NaN/Inf and the run is configured to stop (or gave up)."""


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / cfg.name


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def train(cfg: RunConfig) -> int:
    """Train per `cfg`; returns the process exit code (0, or REQUEUE_EXIT_CODE after a signal)."""
    world = dist.get_world_size() if dist.is_initialized() else _launcher_world_size()
    layout = validate(cfg, resolved_spec(cfg), world)  # before anything is allocated
    tokenizer = load_tokenizer(cfg)
    spec = fit_spec_to_tokenizer(resolved_spec(cfg), tokenizer)
    owns_world = not dist.is_initialized()  # a caller's world outlives this run
    runtime.initialize(layout, seed=cfg.train.seed)
    try:
        return _train_in_world(cfg, spec, layout, tokenizer, world)
    finally:
        # Also after an error: process groups and decoder threads left to interpreter exit
        # can abort the process (SIGABRT) instead of exiting with the error's code.
        if owns_world:
            runtime.shutdown()
        else:
            parallel_state.destroy_model_parallel()


def _train_in_world(
    cfg: RunConfig, spec: InternVLSpec, layout: ParallelLayout, tokenizer: Any, world: int
) -> int:
    claim_run_dir(cfg, spec)  # before anything is written: one run per directory
    if dist.get_rank() == 0:
        for note in layout_notes(cfg, world):
            print(f"note: {note}", flush=True)
        run_dir(cfg).mkdir(parents=True, exist_ok=True)
        (run_dir(cfg) / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))

    run = _Run(cfg, spec, build_model(cfg, spec, layout), tokenizer)
    try:
        run.resume_or_start()
        while run.step < cfg.train.steps:
            run.train_step()
            if run.valid_set is not None and _evaluate_now(cfg, run.step):
                run.evaluate()
            if run.watcher.agreed():
                run.save_for_requeue()
                break
            if cfg.checkpoint.save_every and run.step % cfg.checkpoint.save_every == 0:
                run.save()
        else:
            if run.step not in _saved_steps(run.ckpt_root, run.async_saver):
                run.save()
    finally:
        run.close()
    return run.exit_code


class _Run:
    """The state of one training run on this rank, and what it does between steps."""

    def __init__(self, cfg: RunConfig, spec: InternVLSpec, model: list, tokenizer: Any) -> None:
        self.cfg, self.spec, self.model = cfg, spec, model
        self.rank = dist.get_rank()
        self.optimizer = build_optimizer(cfg, model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.data = data_source(cfg, spec, dp_rank, self.dp_size, tokenizer)
        self.microbatches = cfg.train.global_batch // (cfg.train.micro_batch * self.dp_size)
        # A micro-batch of b rows runs as one row of b * seq_length tokens (step.flatten_rows).
        self.row_tokens = cfg.data.seq_length * cfg.train.micro_batch
        held_out = validation_loader(cfg, spec, dp_rank, self.dp_size, tokenizer)
        self.valid_set = held_out and ValidationSet(
            held_out, self.microbatches, cfg.train.valid_batches
        )
        self.valid_loss: float | None = None
        self.step, self.skipped_in_row, self.exit_code = 0, 0, 0
        self.ckpt_root = run_dir(cfg) / "checkpoints"
        tensorboard = run_dir(cfg) / "tensorboard" if cfg.logging.tensorboard else None
        self.logger = MetricsLogger(tensorboard, cfg.logging.log_every, self.rank == 0)
        self.timers = Timers(log_level=0, log_option="minmax")
        self.timed_steps = 0
        self.watcher = SignalWatcher()
        self.async_saver = ckpt.AsyncSaver() if cfg.checkpoint.async_save else None
        self.export_files = _export_record(cfg, spec) if self.rank == 0 else {}

    def resume_or_start(self) -> None:
        """Continue from this run's latest checkpoint, or start (from `pretrained` if set)."""
        cfg = self.cfg
        resumed = (
            ckpt.resume(self.ckpt_root, self.model, self.optimizer, cfg.checkpoint.verify)
            if cfg.checkpoint.resume
            else None
        )
        if resumed is None:
            if cfg.checkpoint.pretrained:
                ckpt.load_model_only(cfg.checkpoint.pretrained, self.model)
            return
        resume_from, meta, per_rank = resumed
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step = meta["step"]
        self.valid_loss = meta.get("valid_loss")
        if per_rank is not None:
            _set_rng_state(per_rank["rng"])
            self.data.load_state_dict(per_rank["data"])
        elif self.rank == 0:
            print(
                f"resume: {resume_from} was written by another world size; RNG and data "
                "positions start fresh",
                flush=True,
            )
        if self.rank == 0:
            lost = lost_steps_note(run_dir(self.cfg) / "tensorboard", self.step)  # failure cost
            print(f"resumed from {resume_from} at step {self.step}{lost}", flush=True)

    def train_step(self) -> None:
        """One optimizer step (skipped, or the run stopped, on an agreed non-finite value)."""
        timers = self.timers
        started = time.perf_counter()
        timers("data-wait", log_level=0).start()
        rows = self.data.next_microbatches(self.microbatches)
        timers("data-wait").stop()
        timers("forward-backward", log_level=0).start()
        self.optimizer.zero_grad()
        loss = forward_backward(
            internvl_forward_step,
            [iter(rows) for _ in self.model] if len(self.model) > 1 else iter(rows),
            self.model,
            num_microbatches=self.microbatches,
            seq_length=self.row_tokens,
            micro_batch_size=1,
        )
        timers("forward-backward").stop()
        timers("optimizer", log_level=0).start()
        finite = all_finite(self.model, loss)
        grad_norm = self._apply(finite)
        timers("optimizer").stop()
        self.step += 1
        if self.async_saver is not None:
            self.async_saver.poll()
        self._log(rows, loss, grad_norm, finite, time.perf_counter() - started)

    def _apply(self, finite: bool) -> float | None:
        """The optimizer and LR step if the gradients are finite; else count the skip."""
        if finite:
            _, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            self.skipped_in_row = 0
            return grad_norm
        self.skipped_in_row += 1
        t = self.cfg.train
        if t.nonfinite == "stop" or self.skipped_in_row > t.max_skipped_steps:
            raise NonFiniteError(
                f"step {self.step + 1}: non-finite loss or gradients "
                f"({self.skipped_in_row} in a row); set train.nonfinite=skip to skip such "
                "steps, or lower the learning rate"
            )
        return None

    def _log(self, rows: list, loss: float | None, grad_norm, finite: bool, seconds: float):
        cfg = self.cfg
        self.logger.step(
            self.step,
            loss=loss,
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=grad_norm,
            skipped=not finite,
            seconds=seconds,
            samples=_global_samples(rows, self.dp_size),
            tokens=cfg.data.seq_length * cfg.train.global_batch,
            flops=step_flops(self.spec, rows, cfg.train.stage) * self.dp_size,
            world_size=dist.get_world_size(),
            peak_tflops=cfg.logging.peak_tflops,
            fill_rate=getattr(self.data, "fill_rate", None),
            balance=rows[0].get("balance") if rows else None,
        )
        self.timed_steps += 1
        if self.logger.due(self.step):  # every rank: the timers gather over the world
            report = self.timers.get_all_timers_string(
                list(TIMERS), normalizer=self.timed_steps, reset=True
            )
            self.timed_steps = 0
            if self.rank == 0 and report:
                print(f"step {self.step:6d} | {_timers_line(report)}", flush=True)

    def evaluate(self) -> None:
        self.valid_loss = self.valid_set.evaluate(
            internvl_forward_step, self.model, self.row_tokens
        )
        self.logger.validation(self.step, self.valid_loss)

    def save(self) -> None:
        started = time.perf_counter()
        path = ckpt.save(
            self.ckpt_root,
            self.step,
            self.model,
            self.optimizer,
            common={"scheduler": self.scheduler.state_dict(), "valid_loss": self.valid_loss},
            per_rank={"rng": _rng_state(), "data": self.data.state_dict()},
            keep_last=self.cfg.checkpoint.keep_last,
            extra_files=self.export_files,
            async_saver=self.async_saver,
        )
        if self.rank == 0 and self.async_saver:
            print(f"writing in the background {path}", flush=True)
        elif self.rank == 0:
            seconds = time.perf_counter() - started
            print(f"saved {path} ({ckpt.size_note(path)}, {seconds:.1f} s)", flush=True)

    def save_for_requeue(self) -> None:
        """A signal arrived (agreed by every rank): save, commit, and exit for requeue."""
        self.save()
        if self.async_saver is not None:  # committed before anyone exits
            self.async_saver.close()
            self.async_saver = None
        self.exit_code = REQUEUE_EXIT_CODE
        if self.rank == 0 and os.environ.get(REQUEUE_FILE_ENV):
            Path(os.environ[REQUEUE_FILE_ENV]).write_text(f"{self.step}\n")
        if self.rank == 0:
            print(
                f"signal received: saved at step {self.step}, exiting with "
                f"{REQUEUE_EXIT_CODE} (requeue)",
                flush=True,
            )

    def close(self) -> None:
        if self.async_saver is not None:
            self.async_saver.close()  # commit what is in flight before the process exits
        self.watcher.restore()
        self.logger.close()
        if hasattr(self.data, "close"):
            self.data.close()
        if self.valid_set is not None:
            self.valid_set.close()


def _timers_line(report: str) -> str:
    """Megatron's "(min, max) time across ranks (ms)" table as one line: the max per step."""
    cells = re.findall(r"^\s*(\S+) \.+: \(([\d.]+), ([\d.]+)\)", report, flags=re.MULTILINE)
    return "ms per step (max over ranks): " + " | ".join(
        f"{name} {float(high):.1f}" for name, _, high in cells
    )


def _evaluate_now(cfg: RunConfig, step: int) -> bool:
    """After every train.valid_interval steps, and always after the last step."""
    interval = cfg.train.valid_interval
    return step == cfg.train.steps or (interval > 0 and step % interval == 0)


def _saved_steps(root: Path, async_saver: ckpt.AsyncSaver | None) -> set[int]:
    """Steps committed, or (async) already being written: the final save must not repeat them."""
    steps = set(ckpt.committed_steps(root))
    if async_saver is not None and root.is_dir():
        steps |= {int(p.name.split("_")[1]) for p in root.glob("step_*")}
    return steps


def _export_record(cfg: RunConfig, spec: InternVLSpec) -> dict[str, bytes]:
    """What tools/convert_hf.py needs to export a training checkpoint: the exact model shape
    (the flavour resized to the tokenizer) and the tokenizer files."""
    from megatron_internvl.checkpoint.convert import CONVERSION_INFO, TOKENIZER_SUBDIR
    from megatron_internvl.models.registry import spec_to_dict

    record = {
        "flavour": spec.name,
        "spec": spec_to_dict(spec),
        "dtype": cfg.model.dtype,
        "source": f"training run {cfg.name}",
    }
    files = {CONVERSION_INFO: json.dumps(record, indent=1).encode()}
    if cfg.data.tokenizer:
        for item in Path(cfg.data.tokenizer).iterdir():
            if item.is_file():
                files[f"{TOKENIZER_SUBDIR}/{item.name}"] = item.read_bytes()
    return files


def _launcher_world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def _global_samples(rows: list[dict[str, Any]], dp_size: int) -> int:
    return sum(len(row["sample_keys"]) for row in rows) * dp_size


def step_flops(spec: InternVLSpec, rows: list[dict[str, Any]], stage: str) -> float:
    """Model FLOPs of training on `rows` (training/flops.py; sweeps plan compute with it too)."""
    total = 0.0
    for row in rows:
        bounds = row["cu_seqlens"].tolist()
        lengths = [b - a for a, b in itertools.pairwise(bounds)]
        tiles = 0 if row.get("images") is None else row["images"].size(0)
        total += training_flops(spec, lengths, tiles, stage)
    return total
