"""Megatron's load-balanced context-parallel split, as token indices: the one helper that the
model (its input), the training step (the loss mask) and attention (query and key positions)
all use, through `context_share`.

With causal attention the last tokens attend to the most keys, so each sequence is cut into
2*cp chunks and rank r holds chunks r and 2*cp-1-r: every rank gets the same amount of work.
Packed rows are split per sub-sequence (as Transformer Engine does for THD), so every
sub-sequence's *padded* length (`cu_seqlens_padded`, the boundaries in memory) must be divisible
by 2*cp; the packer pads each sample to that multiple (`data.packing`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

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


@dataclass(frozen=True)
class ContextShare:
    """One context-parallel rank's share of a row whose sub-sequences lie at `boundaries`."""

    boundaries: tuple[int, ...]
    cp_size: int
    cp_rank: int
    indices: torch.Tensor
    """Global token indices this rank holds, in its storage order."""
    all_indices: torch.Tensor
    """Every rank's indices, rank after rank (the order of an all-gather over the CP group)."""

    def local(self, tensor: torch.Tensor, seq_dim: int) -> torch.Tensor:
        """This rank's share of `tensor` (the full row along `seq_dim`)."""
        if self.cp_size == 1:
            return tensor
        return tensor.index_select(seq_dim, self.indices.to(tensor.device))


@lru_cache(maxsize=64)
def _share(boundaries: tuple[int, ...], cp_size: int, cp_rank: int) -> ContextShare:
    per_rank = [load_balanced_indices(boundaries, cp_size, r) for r in range(cp_size)]
    return ContextShare(boundaries, cp_size, cp_rank, per_rank[cp_rank], torch.cat(per_rank))


def memory_boundaries(packed_seq_params: Any) -> torch.Tensor:
    """Sub-sequence boundaries in the row as stored: `cu_seqlens_q_padded` when the samples are
    padded (THD with padding), else `cu_seqlens_q`."""
    padded = getattr(packed_seq_params, "cu_seqlens_q_padded", None)
    return padded if padded is not None else packed_seq_params.cu_seqlens_q


def context_share(
    row_length: int, cp_size: int, cp_rank: int, packed_seq_params: Any = None
) -> ContextShare:
    """The split of a row of `row_length` tokens (packed per `packed_seq_params`, if given);
    computed once per row and layout, whoever asks first."""
    if packed_seq_params is None:
        bounds: tuple[int, ...] = (0, row_length)
    else:
        bounds = tuple(int(b) for b in memory_boundaries(packed_seq_params).tolist())
    return _share(bounds, cp_size, cp_rank)


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
    return _share(tuple(int(b) for b in bounds), cp_size, cp_rank).local(tensor, seq_dim)
