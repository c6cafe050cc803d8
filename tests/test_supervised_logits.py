"""The output layer and cross-entropy run only on tokens that carry loss
(`SupervisedLogitsGPTModel`), with the same loss and gradients as Megatron's own full-row path.

Oracle: Megatron-Core's GPTModel post-processing (logits and cross-entropy over every token,
masked by the loss function afterwards), reached by calling the same model without a loss mask.
Tolerance: fp32 rounding (the output layer's weight gradient sums fewer zero rows).
"""

from __future__ import annotations

import pytest
import torch

from megatron_internvl.parallel.layout import ParallelLayout
from tests import gpt_cases, internvl_cases


def _without_loss_mask(_module, args, kwargs):
    kwargs.pop("loss_mask", None)
    return args, kwargs


def _loss_grads_and_logit_rows(model, run_step) -> tuple[float, dict[str, torch.Tensor], int]:
    rows = []
    [chunk] = model
    output_layer = getattr(chunk.module, "language_model", chunk.module).output_layer
    hook = output_layer.register_forward_hook(
        lambda _m, args, _o: rows.append(args[0][..., 0].numel())  # tokens: [s, b, h] -> s * b
    )
    try:
        loss = run_step()
    finally:
        hook.remove()
    grads = {n: p.main_grad.clone() for n, p in chunk.module.named_parameters()}
    return loss, grads, sum(rows)


def _assert_same_as_full_rows(model, run_step, batches) -> None:
    """Loss and gradients with the loss mask (selected rows) equal those without it."""
    loss, grads, rows = _loss_grads_and_logit_rows(model, run_step)
    handle = model[0].module.register_forward_pre_hook(_without_loss_mask, with_kwargs=True)
    try:
        full_loss, full_grads, full_rows = _loss_grads_and_logit_rows(model, run_step)
    finally:
        handle.remove()
    supervised = sum(int(b["loss_mask"].count_nonzero()) for b in batches)
    assert rows == supervised < full_rows == sum(b["tokens"].numel() for b in batches)
    assert loss == pytest.approx(full_loss, rel=1e-6)
    for name, grad in grads.items():
        scale = float(full_grads[name].abs().max()) or 1.0
        torch.testing.assert_close(
            grad, full_grads[name], rtol=1e-5, atol=1e-6 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert any(g.count_nonzero() for n, g in grads.items() if "output_layer" in n)


@pytest.mark.parametrize("packed", [True, False], ids=["packed-b1", "unpacked-b2"])
def test_internvl_loss_and_gradients_equal_the_full_output_layer(single_rank, packed):
    torch.manual_seed(0)
    spec = "tiny_internlm_6b_style"
    batches = (
        internvl_cases.packed_microbatches(spec)
        if packed
        else internvl_cases.unpacked_microbatches(spec)
    )
    model = internvl_cases.build(spec, ParallelLayout())
    _assert_same_as_full_rows(
        model, lambda: internvl_cases.step(model, ParallelLayout(), batches), batches
    )


def test_language_model_loss_and_gradients_equal_the_full_output_layer(single_rank):
    torch.manual_seed(0)
    batches = gpt_cases.global_batch()
    model, _ = gpt_cases.build(ParallelLayout())
    _assert_same_as_full_rows(
        model, lambda: gpt_cases.train_step(model, ParallelLayout(), batches), batches
    )
