"""The training loop: model + data + optimizer + checkpoints + signals + logging.

One call of `train(cfg)` per rank (torchrun or srun started the ranks). Every decision that one
rank could see differently (a NaN, a signal) is all-reduced before anyone acts.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_internvl.checkpoint import distributed as ckpt
from megatron_internvl.config.precision import PrecisionConfig
from megatron_internvl.config.schema import RunConfig
from megatron_internvl.config.validate import validate
from megatron_internvl.data.synthetic import SyntheticRows, SyntheticSpec
from megatron_internvl.models.internvl import build_internvl_chunks
from megatron_internvl.models.registry import InternVLSpec, get_spec, spec_from_dict
from megatron_internvl.parallel import runtime
from megatron_internvl.training.flops import training_flops
from megatron_internvl.training.freezing import freeze_for_stage
from megatron_internvl.training.metrics import MetricsLogger
from megatron_internvl.training.signals import (
    REQUEUE_EXIT_CODE,
    REQUEUE_FILE_ENV,
    SignalWatcher,
)
from megatron_internvl.training.step import forward_backward, internvl_forward_step, wrap_with_ddp


class NonFiniteError(RuntimeError):
    """The loss or gradients became NaN/Inf and the run is configured to stop (or gave up)."""


def resolved_spec(cfg: RunConfig) -> InternVLSpec:
    """The registry flavour (or `model.spec_file`'s shape) with the recipe's depth overrides."""
    if cfg.model.spec_file:
        spec = spec_from_dict(json.loads(Path(cfg.model.spec_file).read_text()))
    else:
        spec = get_spec(cfg.model.flavour)
    if cfg.model.num_layers:
        spec = dataclasses.replace(
            spec, language=dataclasses.replace(spec.language, num_layers=cfg.model.num_layers)
        )
    vision = dataclasses.replace(
        spec.vision,
        num_layers=cfg.model.vit_layers or spec.vision.num_layers,
        drop_path_rate=cfg.model.vit_drop_path,
    )
    return dataclasses.replace(spec, vision=vision)


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


def _all_finite(model: list[torch.nn.Module], loss: float | None) -> bool:
    """Collective: False on every rank if any rank sees a NaN/Inf loss or gradient."""
    bad = loss is None or not math.isfinite(loss)
    for chunk in model:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is not None and not torch.isfinite(grad).all():
                bad = True
                break
    flag = torch.tensor([1.0 if bad else 0.0], device=torch.cuda.current_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def _optimizer(cfg: RunConfig, model: list[torch.nn.Module]):
    t = cfg.train
    bf16 = cfg.model.dtype == "bfloat16"
    return get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps,
            clip_grad=t.clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        ),
        model,
    )


def _scheduler(cfg: RunConfig, optimizer) -> OptimizerParamScheduler:
    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_fraction * t.steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=t.steps,
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
    )


def train(cfg: RunConfig) -> int:
    """Train per `cfg`; returns the process exit code (0, or REQUEUE_EXIT_CODE after a signal)."""
    world = dist.get_world_size() if dist.is_initialized() else _launcher_world_size()
    layout = validate(cfg, resolved_spec(cfg), world)  # before anything is allocated
    tokenizer = load_tokenizer(cfg)
    spec = fit_spec_to_tokenizer(resolved_spec(cfg), tokenizer)
    runtime.initialize(layout, seed=cfg.train.seed)
    rank = dist.get_rank()
    out = run_dir(cfg)
    ckpt_root = out / "checkpoints"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))

    chunks = build_internvl_chunks(
        spec,
        layout,
        cfg.data.seq_length,
        first_stage_layers=cfg.parallel.first_stage_layers,
        vision_pad_heads_to=cfg.model.vision_pad_heads_to,
        backend=cfg.model.backend,
        precision=PrecisionConfig(cfg.model.dtype, cfg.model.fp8_recipe),
        **recompute_overrides(cfg.model.recompute),
    )
    for chunk in chunks:
        runtime.adapt_model_config(chunk.config)
    freeze_for_stage(chunks, cfg.train.stage)
    model = wrap_with_ddp(chunks, chunks[0].config, cfg.parallel.distributed_optimizer)
    optimizer = _optimizer(cfg, model)
    scheduler = _scheduler(cfg, optimizer)

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    data = data_source(cfg, spec, dp_rank, dp_size, tokenizer)
    microbatches = cfg.train.global_batch // (cfg.train.micro_batch * dp_size)

    step = 0
    resumed = (
        ckpt.resume(ckpt_root, model, optimizer, cfg.checkpoint.verify)
        if cfg.checkpoint.resume
        else None
    )
    if resumed is not None:
        resume_from, meta, per_rank = resumed
        scheduler.load_state_dict(meta["scheduler"])
        step = meta["step"]
        if per_rank is not None:
            _set_rng_state(per_rank["rng"])
            data.load_state_dict(per_rank["data"])
        elif rank == 0:
            print(
                f"resume: {resume_from} was written by another world size; RNG and data "
                "positions start fresh",
                flush=True,
            )
        if rank == 0:
            print(f"resumed from {resume_from} at step {step}", flush=True)
    elif cfg.checkpoint.pretrained:
        ckpt.load_model_only(cfg.checkpoint.pretrained, model)

    logger = MetricsLogger(
        out / "tensorboard" if cfg.logging.tensorboard else None, cfg.logging.log_every, rank == 0
    )
    watcher = SignalWatcher()
    async_saver = ckpt.AsyncSaver() if cfg.checkpoint.async_save else None

    export_files = _export_record(cfg, spec) if rank == 0 else {}

    def save() -> None:
        path = ckpt.save(
            ckpt_root,
            step,
            model,
            optimizer,
            common={"scheduler": scheduler.state_dict()},
            per_rank={"rng": _rng_state(), "data": data.state_dict()},
            keep_last=cfg.checkpoint.keep_last,
            extra_files=export_files,
            async_saver=async_saver,
        )
        if rank == 0:
            how = "writing in the background" if async_saver else "saved"
            print(f"{how} {path}", flush=True)

    skipped_in_row = 0
    exit_code = 0
    try:
        while step < cfg.train.steps:
            started = time.perf_counter()
            rows = data.next_microbatches(microbatches)
            optimizer.zero_grad()
            loss = forward_backward(
                internvl_forward_step,
                [iter(rows) for _ in model] if len(model) > 1 else iter(rows),
                model,
                num_microbatches=microbatches,
                seq_length=cfg.data.seq_length,
                micro_batch_size=cfg.train.micro_batch,
            )
            finite = _all_finite(model, loss)
            grad_norm = None
            if finite:
                _, grad_norm, _ = optimizer.step()
                scheduler.step(increment=1)
                skipped_in_row = 0
            else:
                skipped_in_row += 1
                if cfg.train.nonfinite == "stop" or skipped_in_row > cfg.train.max_skipped_steps:
                    raise NonFiniteError(
                        f"step {step + 1}: non-finite loss or gradients "
                        f"({skipped_in_row} in a row); set train.nonfinite=skip to skip such "
                        "steps, or lower the learning rate"
                    )
            step += 1
            if async_saver is not None:
                async_saver.poll()
            flops = step_flops(spec, rows, cfg.train.stage) * dp_size
            logger.step(
                step,
                loss=loss,
                lr=optimizer.param_groups[0]["lr"],
                grad_norm=grad_norm,
                skipped=not finite,
                seconds=time.perf_counter() - started,
                samples=_global_samples(rows, dp_size),
                tokens=cfg.data.seq_length * cfg.train.global_batch,
                flops=flops,
                world_size=dist.get_world_size(),
                peak_tflops=cfg.logging.peak_tflops,
            )
            if watcher.agreed():
                save()
                if async_saver is not None:  # committed before anyone exits
                    async_saver.close()
                    async_saver = None
                exit_code = REQUEUE_EXIT_CODE
                if rank == 0 and os.environ.get(REQUEUE_FILE_ENV):
                    Path(os.environ[REQUEUE_FILE_ENV]).write_text(f"{step}\n")
                if rank == 0:
                    print(
                        f"signal received: saved at step {step}, exiting with "
                        f"{REQUEUE_EXIT_CODE} (requeue)",
                        flush=True,
                    )
                break
            if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0:
                save()
        else:
            if step not in _saved_steps(ckpt_root, async_saver):
                save()
    finally:
        if async_saver is not None:
            async_saver.close()  # commit what is in flight before the process exits
        watcher.restore()
        logger.close()
    runtime.shutdown()
    return exit_code


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


def recompute_overrides(recompute: str | None) -> dict[str, Any]:
    """TransformerConfig fields for model.recompute (None, "full" or "selective")."""
    if recompute is None:
        return {}
    if recompute == "full":
        return {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    return {"recompute_granularity": "selective"}


class ShardSource:
    """The shard loader seen as the loop's data source (micro-batches by count, state)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def next_microbatches(self, count: int) -> list[dict[str, Any]]:
        return [next(self.loader) for _ in range(count)]

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def load_tokenizer(cfg: RunConfig) -> Any | None:
    if cfg.data.source != "shards":
        return None
    if not cfg.data.tokenizer:
        raise ValueError("data.source=shards needs data.tokenizer (a HF tokenizer directory)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.data.tokenizer)


def fit_spec_to_tokenizer(spec: InternVLSpec, tokenizer: Any | None) -> InternVLSpec:
    """Embeddings sized to the tokenizer and its `<IMG_CONTEXT>` id, as InternVL resizes them."""
    if tokenizer is None:
        return spec
    from megatron_internvl.data.chat import IMG_CONTEXT

    image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    language = dataclasses.replace(spec.language, vocab_size=len(tokenizer))
    return dataclasses.replace(spec, language=language, image_token_id=image_token_id)


def data_source(
    cfg: RunConfig, spec: InternVLSpec, dp_rank: int, dp_size: int, tokenizer: Any = None
) -> Any:
    """This data-parallel rank's source of micro-batches (shards or synthetic rows), with state."""
    if cfg.data.source == "shards":
        from megatron_internvl.data.loader import (
            DatasetSpec,
            InternVLLoader,
            LoaderConfig,
            shard_list,
        )
        from megatron_internvl.data.tiler import TilerConfig

        weights = cfg.data.weights or [1.0] * len(cfg.data.shards)
        if len(weights) != len(cfg.data.shards):
            raise ValueError(
                f"data.weights has {len(weights)} entries for {len(cfg.data.shards)} shard sets"
            )
        datasets = [
            DatasetSpec(name=str(path), shards=shard_list([path]), weight=weight)
            for path, weight in zip(cfg.data.shards, weights, strict=True)
        ]
        loader_cfg = LoaderConfig(
            seq_length=cfg.data.seq_length,
            max_tiles_per_row=cfg.data.max_tiles_per_row,
            loss_reduction=cfg.data.loss_reduction,
            tokens_per_tile=spec.tokens_per_tile,
            seed=cfg.train.seed,
            skip_check_after=50,
            tiler=TilerConfig(
                image_size=spec.vision.image_size,
                max_num=cfg.data.max_tiles_per_image,
                device_id=torch.cuda.current_device() if torch.cuda.is_available() else None,
            ),
        )
        return ShardSource(InternVLLoader(datasets, tokenizer, loader_cfg, dp_rank, dp_size))
    if cfg.data.source == "synthetic":
        synthetic = SyntheticSpec(
            vocab_size=spec.language.vocab_size,
            image_token_id=spec.image_token_id,
            tokens_per_tile=spec.tokens_per_tile,
            image_size=spec.vision.image_size,
            seq_length=cfg.data.seq_length,
            text_vocab=cfg.data.synthetic_text_vocab,
        )
        return SyntheticRows(synthetic, cfg.train.seed, dp_rank, dp_size)
    raise ValueError(f"data.source={cfg.data.source!r}; use 'synthetic' or 'shards'")


def _launcher_world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def _global_samples(rows: list[dict[str, Any]], dp_size: int) -> int:
    return sum(len(row["cu_seqlens"]) - 1 for row in rows) * dp_size


def step_flops(spec: InternVLSpec, rows: list[dict[str, Any]], stage: str) -> float:
    """Model FLOPs of training on `rows` (training/flops.py; sweeps plan compute with it too)."""
    total = 0.0
    for row in rows:
        bounds = row["cu_seqlens"].tolist()
        lengths = [b - a for a, b in itertools.pairwise(bounds)]
        tiles = 0 if row.get("images") is None else row["images"].size(0)
        total += training_flops(spec, lengths, tiles, stage)
    return total
