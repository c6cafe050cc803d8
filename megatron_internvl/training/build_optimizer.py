"""The optimizer of a run (Megatron's Adam, distributed if asked) and its LR schedule."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_internvl.config.schema import RunConfig


def build_optimizer(cfg: RunConfig, model: list[torch.nn.Module]) -> Any:
    """AdamW over the trainable parameters, with gradient clipping."""
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


def build_scheduler(cfg: RunConfig, optimizer: Any) -> OptimizerParamScheduler:
    """Linear warm-up to train.lr, cosine decay to train.min_lr at train.steps."""
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
