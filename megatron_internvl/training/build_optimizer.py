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
    return megatron_optimizer(
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


def megatron_optimizer(config: OptimizerConfig, model: list[torch.nn.Module]) -> Any:
    """Megatron's optimizer for `config`, its torch Adam over CPU parameters on the fused kernel.

    Without Transformer Engine or Apex, Megatron steps torch's Adam(W) with torch's default,
    which on CPU tensors is the per-tensor loop: about six elementwise passes with temporaries
    over every parameter, seconds per step for a few hundred million parameters on a small CPU.
    The fused CPU kernel updates each parameter in one pass: the same update up to fp32
    rounding (tests/test_build_optimizer.py). GPU parameters keep Megatron's choice.
    """
    optimizer = get_megatron_optimizer(config, model)
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_adam = getattr(inner, "optimizer", None)
        if not isinstance(torch_adam, torch.optim.Adam):  # torch's AdamW is an Adam too
            continue
        for group in torch_adam.param_groups:
            on_cpu = all(p.device.type == "cpu" for p in group["params"])
            if on_cpu and not group["differentiable"]:
                group["fused"], group["foreach"] = True, False
    return optimizer


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
