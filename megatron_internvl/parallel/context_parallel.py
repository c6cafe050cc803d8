"""Megatron's load-balanced context-parallel split, as token indices.

With causal attention the last tokens attend to the most keys, so each sequence is cut into
2*cp chunks and rank r holds chunks r and 2*cp-1-r: every rank gets the same amount of work.
Packed rows are split per sub-sequence (as Transformer Engine does for THD), so every
sub-sequence length must be divisible by 2*cp.
"""

from __future__ import annotations

import itertools

import torch


def load_balanced_indices(
    cu_seqlens: torch.Tensor | list[int], cp_size: int, cp_rank: int
) -> torch.Tensor:
    """Global token indices held by `cp_rank`, in the order that rank stores them.

    `cu_seqlens` are the sub-sequence boundaries of one row ([0, S] for an unpacked row).
    """
    bounds = [int(b) for b in cu_seqlens]
    if cp_size == 1:
        return torch.arange(bounds[0], bounds[-1])
    chunks = 2 * cp_size
    pieces = []
    for start, end in itertools.pairwise(bounds):
        length = end - start
        if length % chunks:
            raise ValueError(
                f"context parallel size {cp_size} needs every sequence length divisible by "
                f"{chunks}, got a sequence of {length} tokens at offset {start}; pad each "
                f"sample to a multiple of {chunks}"
            )
        step = length // chunks
        for chunk in (cp_rank, chunks - 1 - cp_rank):
            pieces.append(torch.arange(start + chunk * step, start + (chunk + 1) * step))
    return torch.cat(pieces)


def split_for_rank(
    tensor: torch.Tensor,
    seq_dim: int,
    cp_size: int,
    cp_rank: int,
    cu_seqlens: torch.Tensor | list[int] | None = None,
) -> torch.Tensor:
    """This rank's share of `tensor` along `seq_dim` under the load-balanced split."""
    if cp_size == 1:
        return tensor
    bounds = [0, tensor.size(seq_dim)] if cu_seqlens is None else cu_seqlens
    index = load_balanced_indices(bounds, cp_size, cp_rank).to(tensor.device)
    return tensor.index_select(seq_dim, index)
