"""The run's optimizer: Megatron's Adam on torch's fused CPU kernel takes the same steps as
Megatron's default (torch's per-tensor Adam), up to fp32 rounding."""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_internvl.parallel.layout import ParallelLayout
from megatron_internvl.training.build_optimizer import megatron_optimizer
from tests import gpt_cases


def _train(make_optimizer, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor], list]:
    torch.manual_seed(0)
    model, _ = gpt_cases.build(ParallelLayout())
    config = OptimizerConfig(
        optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=0.5, adam_eps=1e-4
    )
    optimizer = make_optimizer(config, model)
    losses, batches = [], gpt_cases.global_batch()
    for _ in range(steps):
        optimizer.zero_grad()
        losses.append(gpt_cases.train_step(model, ParallelLayout(), batches))
        optimizer.step()
    groups = [g for inner in optimizer.chained_optimizers for g in inner.optimizer.param_groups]
    params = {n: p.detach().clone() for n, p in model[0].module.named_parameters()}
    return losses, params, groups


def test_fused_cpu_adam_takes_megatrons_default_steps(single_rank):
    losses, params, groups = _train(megatron_optimizer)
    ref_losses, ref_params, ref_groups = _train(get_megatron_optimizer)
    assert all(g["fused"] for g in groups) and not any(g["fused"] for g in ref_groups)
    assert len(groups) == 2  # weight-decayed matrices, and norms without decay
    torch.testing.assert_close(losses, ref_losses, rtol=1e-6, atol=0)
    assert losses[-1] < losses[0]  # the steps train (on the same batch)
    for name, param in params.items():
        torch.testing.assert_close(
            param, ref_params[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_gradient_clipping_scales_in_place_with_megatrons_products(single_rank):
    """The CPU platform's in-place clipping scale: bitwise Megatron's fallback (a copy)."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_scale

    assert clip_grads.multi_tensor_scale_impl is not local_multi_tensor_scale
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((300, 7), (5,), (2, 3, 4))]
    for param in params:
        param.grad = torch.randn(param.shape, generator=gen)
    expected = [p.grad.clone() for p in params]
    local_multi_tensor_scale(2048, None, [expected, expected], 0.5 / (2.0 + 1.0e-6))
    storage = [p.grad.data_ptr() for p in params]
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=0.5, total_norm=2.0)
    for param, reference, pointer in zip(params, expected, storage, strict=True):
        assert torch.equal(param.grad, reference) and param.grad.data_ptr() == pointer
