"""Tile-aware data-parallel balancing: deal one step's samples to DP ranks and their rows.

A rank's step time follows its work, and every rank waits for the slowest at the gradient
reduction. InternVL's samples differ widely: a caption is 1 tile and a few dozen tokens, a
document 12 tiles, a video 32 frames, a text-only sample none. Dealing samples in stream order
(each rank packing its own share until its rows are full) leaves ranks with very different
work. Here a sample's cost is

    tiles x (ViT + projector per tile) + tokens x (LLM per token) + tokens^2 x (attention)

with the coefficients of training/flops.py (the MFU formula; made by training/sample_cost.py).
The step's samples are dealt costliest first, each to the least-loaded rank that has a row with
room for it (row capacity: tokens and tiles), within the rank to its least-loaded row (so
pipeline micro-batches are balanced too). Ties go by sample index and a rank order rotated by
the step index, so the deal is a pure function of (step, metadata, sizes): every rank computes
the same assignment without communication, and a resumed run recomputes it exactly. Only
metadata known before decoding is used (tile count from the image sizes, a token estimate), so
the loader can decide before it decodes. Samples that fit nowhere are returned as left over,
for the next step.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SampleMeta:
    """What the shard index records of a sample (before decoding)."""

    tiles: int
    """Image tiles (all images and video frames of the sample, thumbnails included)."""
    tokens: int
    """LLM tokens: text plus tokens_per_tile x tiles."""


@dataclass(frozen=True)
class CostModel:
    """Training FLOPs of a sample: per tile, per token, per token^2 (one sample's attention).
    training/sample_cost.py derives them from the FLOPs model (`sample_cost_model`)."""

    per_tile: float
    per_token: float
    per_token_squared: float

    def cost(self, sample: SampleMeta) -> float:
        return (
            sample.tiles * self.per_tile
            + sample.tokens * self.per_token
            + sample.tokens**2 * self.per_token_squared
        )


@dataclass(frozen=True)
class Assignment:
    """One step's deal: rows[rank][micro_batch] lists sample indices, in dealing order."""

    rows: list[list[list[int]]]
    left_over: list[int]
    """Samples that fit no row (the loader carries them into the next step)."""
    rank_cost: list[float]


def balance(
    samples: Sequence[SampleMeta],
    model: CostModel,
    ranks: int,
    rows_per_rank: int,
    row_tokens: int,
    row_tiles: int,
    step: int = 0,
) -> Assignment:
    """Deal `samples` to `ranks` x `rows_per_rank` rows of at most `row_tokens` tokens and
    `row_tiles` tiles, minimising the largest rank cost (greedy, costliest first)."""
    if ranks < 1 or rows_per_rank < 1:
        raise ValueError(f"balance: ranks={ranks} and rows_per_rank={rows_per_rank} must be >= 1")
    costs = [model.cost(s) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: (-costs[i], i))
    rows = [[[] for _ in range(rows_per_rank)] for _ in range(ranks)]
    room = [[[row_tokens, row_tiles] for _ in range(rows_per_rank)] for _ in range(ranks)]
    row_cost = [[0.0] * rows_per_rank for _ in range(ranks)]
    rank_cost = [0.0] * ranks
    # (cost, rotated position, rank): the step rotates who receives the first, largest sample.
    heap = [(0.0, (r - step) % ranks, r) for r in range(ranks)]
    heapq.heapify(heap)
    left_over = []
    for i in order:
        need = samples[i]
        popped, placed = [], False
        while heap and not placed:
            entry = heapq.heappop(heap)
            rank = entry[2]
            fits = [
                j
                for j in range(rows_per_rank)
                if room[rank][j][0] >= need.tokens and room[rank][j][1] >= need.tiles
            ]
            if fits:
                j = min(fits, key=lambda k: (row_cost[rank][k], k))
                rows[rank][j].append(i)
                room[rank][j][0] -= need.tokens
                room[rank][j][1] -= need.tiles
                row_cost[rank][j] += costs[i]
                rank_cost[rank] += costs[i]
                entry = (rank_cost[rank], entry[1], rank)
                placed = True
            popped.append(entry)
        for entry in popped:
            heapq.heappush(heap, entry)
        if not placed:
            left_over.append(i)
    return Assignment(rows, sorted(left_over), rank_cost)
