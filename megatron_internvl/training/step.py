"""One optimizer step through Megatron-Core's schedules, with token-averaged loss.

The loss of a step is sum(CE over supervised tokens) / (number of supervised tokens), taken over
every microbatch and every data- and context-parallel rank (`calculate_per_token_loss`): the
same number, and the same gradients, whatever the parallel layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
)
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_internvl.parallel import vision_groups
from megatron_internvl.parallel.context_parallel import context_share

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron loss_func contract: (summed loss, token count, values to report)."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (per_token_loss.reshape(-1).float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def wrap_with_ddp(
    chunks: list[torch.nn.Module],
    config: TransformerConfig,
    use_distributed_optimizer: bool = False,
) -> list[DistributedDataParallel]:
    """Megatron DDP around each model chunk, grads in fp32 buffers (`param.main_grad`)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0
        )
        for i, chunk in enumerate(chunks)
    ]
    # Megatron's, after summing the gradients of ViT replicas (parallel.vision_tensor < tensor).
    config.finalize_model_grads_func = vision_groups.finalize_model_grads
    return wrapped


def forward_backward(
    forward_step: Callable[[Iterator[Any], torch.nn.Module], tuple[torch.Tensor, LossFunc]],
    data_iterator: Iterator[Any] | list[Iterator[Any]],
    model: list[torch.nn.Module],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> float | None:
    """Run forward and backward over `num_microbatches`; return the step's mean token loss.

    The loss is returned on every rank (broadcast from the last pipeline stage, summed over
    data- and context-parallel ranks). Gradients are left in `param.main_grad`, already reduced
    and divided by the global token count by `finalize_model_grads`.
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    totals = torch.zeros(2, dtype=torch.float64, device=torch.cuda.current_device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for report in reports:
            totals += report["lm loss"].double()
    torch.distributed.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(
        totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
    )
    totals = totals.cpu()
    return float(totals[0] / totals[1]) if totals[1] > 0 else None


def all_finite(model: list[torch.nn.Module], loss: float | None) -> bool:
    """Collective: False on every rank if any rank sees a NaN/Inf loss or gradient.

    One reduction per gradient buffer on the device (Megatron DDP keeps every gradient in a few
    contiguous buffers), one all-reduce and one host sync for the whole model.
    """
    device = torch.cuda.current_device()
    local_bad = [torch.tensor(loss is None or not math.isfinite(loss), device=device)]
    for grads in _gradient_tensors(model):
        local_bad.append(~torch.isfinite(grads).all())
    flag = torch.stack(local_bad).any().float().reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() == 0.0


def _gradient_tensors(model: list[torch.nn.Module]) -> list[torch.Tensor]:
    """The DDP chunks' gradient buffers (a plain module: its parameters' `main_grad`)."""
    tensors = []
    for chunk in model:
        buffers = getattr(chunk, "buffers", None)
        if isinstance(buffers, list):
            tensors += [b.grad_data for b in buffers + chunk.expert_parallel_buffers]
        else:
            tensors += [
                p.main_grad for p in chunk.parameters() if getattr(p, "main_grad", None) is not None
            ]
    return tensors


def to_device(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch's tensors on this rank's device (loaders hand out host tensors; images may
    already be on the GPU when DALI decoded them there)."""
    device = torch.cuda.current_device()
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


ROW_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def flatten_rows(batch: dict[str, Any]) -> dict[str, Any]:
    """b packed rows ([b, s]) as one row of b * s tokens ([1, b * s]).

    Attention stays inside each sub-sample (`cu_seqlens` already counts over the flattened
    tokens) and images are in row-major order, so this changes no number; it lets THD kernels,
    the CP split and pipeline shapes see one sequence.
    """
    if batch["tokens"].size(0) == 1 or batch.get("cu_seqlens") is None:
        return batch  # one row, or unpacked rows ([b, s] with plain causal attention)
    return {k: v.reshape(1, -1) if k in ROW_KEYS else v for k, v in batch.items()}


def bind_loss(loss_mask: torch.Tensor) -> LossFunc:
    """The loss_func for one microbatch."""
    return partial(masked_token_loss, loss_mask)


def language_model_forward_step(
    data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module
) -> tuple[torch.Tensor, LossFunc]:
    """Forward one text microbatch (tokens, labels, loss_mask, position_ids: [b, s]).

    Each context-parallel rank keeps its load-balanced share of the sequence.
    """
    batch = to_device(next(data_iterator))
    share = context_share(
        batch["tokens"].size(1),
        parallel_state.get_context_parallel_world_size(),
        parallel_state.get_context_parallel_rank(),
    )
    batch = {k: share.local(v, 1) for k, v in batch.items()}
    # The model's output layer runs only on tokens with loss (SupervisedLogitsGPTModel).
    loss_mask = batch["loss_mask"]
    output = model(
        batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=loss_mask
    )
    return output, bind_loss(loss_mask)


def internvl_forward_step(
    data_iterator: Iterator[dict[str, Any]], model: torch.nn.Module
) -> tuple[torch.Tensor, LossFunc]:
    """Forward one InternVL microbatch.

    Keys: tokens, labels, loss_mask, position_ids ([b, s] full rows), images ([tiles, 3, S, S]
    or absent for text-only), cu_seqlens (sub-sample boundaries over the b * s tokens) and
    sample_keys (for error messages). A micro-batch of b packed rows runs as one row of b * s
    tokens (`flatten_rows`): the schedule is called with seq_length b * s and micro-batch 1.
    The model splits the row for context parallelism; the loss mask is split the same way here.
    """
    batch = flatten_rows(to_device(next(data_iterator)))
    packed = packed_seq_params(batch)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        images=batch.get("images"),
        labels=batch["labels"],
        packed_seq_params=packed,
        sample_keys=batch.get("sample_keys"),
        loss_mask=batch["loss_mask"],  # the output layer runs only where it is nonzero
    )
    share = context_share(
        batch["loss_mask"].size(1),
        parallel_state.get_context_parallel_world_size(),
        parallel_state.get_context_parallel_rank(),
        packed,
    )
    return output, bind_loss(share.local(batch["loss_mask"], 1))


def packed_seq_params(batch: dict[str, Any]) -> PackedSeqParams | None:
    """THD boundaries of a packed micro-batch: `cu_seqlens` (real tokens of each sub-sample)
    and, when the packer padded the samples, `cu_seqlens_padded` (where they lie in the row;
    attention, RoPE and the CP split follow these, the padding is masked out)."""
    cu_seqlens = batch.get("cu_seqlens")
    if cu_seqlens is None:
        return None
    cu_seqlens = cu_seqlens.to(torch.int32)
    padded = batch.get("cu_seqlens_padded")
    padded = None if padded is None else padded.to(torch.int32)
    extent = padded if padded is not None else cu_seqlens
    longest = int((extent[1:] - extent[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=padded,
        cu_seqlens_kv_padded=padded,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )
