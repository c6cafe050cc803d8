"""Autograd-aware collectives with backward passes that are correct on every backend."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGatherSeq(torch.autograd.Function):
    """All-gather along dim 0; backward sums the incoming gradient over ranks and keeps our slice.

    torch.distributed.nn.functional.all_gather returns wrong gradients on gloo (torch 2.13) when
    the incoming gradient is non-contiguous, which attention produces; this one makes it
    contiguous and needs only all_reduce, which every backend has.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        world = dist.get_world_size(ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad.chunk(world, dim=0)[rank].contiguous(), None


def all_gather_dim0(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 (rank order), differentiably."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    return _AllGatherSeq.apply(tensor, group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose result every rank consumes differently: backward sums too."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Differentiable sum over `group` (e.g. statistics shared by TP-sharded channels)."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    return _AllReduceSum.apply(tensor, group)
