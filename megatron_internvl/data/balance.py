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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


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


class _Rows:
    """The rows of every rank being filled: room left, the balanced load of each rank."""

    def __init__(self, ranks: int, rows_per_rank: int, row_tokens: int, row_tiles: int) -> None:
        self.samples = [[[] for _ in range(rows_per_rank)] for _ in range(ranks)]
        self.room = [[[row_tokens, row_tiles] for _ in range(rows_per_rank)] for _ in range(ranks)]
        self.row_load = [[0.0] * rows_per_rank for _ in range(ranks)]
        # Most tokens and most tiles left in any row of a rank: a quick "fits nowhere".
        self.most = [[row_tokens, row_tiles] for _ in range(ranks)]

    def fitting(self, rank: int, sample: SampleMeta) -> list[int]:
        most = self.most[rank]
        if sample.tokens > most[0] or sample.tiles > most[1]:
            return []
        return [
            j
            for j, (tokens, tiles) in enumerate(self.room[rank])
            if tokens >= sample.tokens and tiles >= sample.tiles
        ]

    def put(self, rank: int, row: int, index: int, sample: SampleMeta, load: float) -> None:
        self.samples[rank][row].append(index)
        self.room[rank][row][0] -= sample.tokens
        self.room[rank][row][1] -= sample.tiles
        self.row_load[rank][row] += load
        self.most[rank] = [max(r[0] for r in self.room[rank]), max(r[1] for r in self.room[rank])]


def balance(
    samples: Sequence[SampleMeta],
    model: CostModel,
    ranks: int,
    rows_per_rank: int,
    row_tokens: int,
    row_tiles: int,
    step: int = 0,
    padded_rows: bool = True,
) -> Assignment:
    """Deal `samples` to `ranks` x `rows_per_rank` rows of at most `row_tokens` tokens and
    `row_tiles` tiles, minimising the largest rank cost.

    `padded_rows` (the loader today): every row is computed at its full `row_tokens` width, so
    the LLM's per-token cost is the same on every row and the balance is over what differs,
    tiles and per-sample len^2 (the padding is one more segment); otherwise over whole costs.
    Phase 1 deals the samples that matter for the balance, heaviest first, each to the
    least-loaded rank with room (its least-loaded row); phase 2 deals the light rest, longest
    first, to the least-loaded rank with room too, but into its row with the least room that
    fits (best fit), so the gaps phase 1 left get filled and nothing is left over needlessly.
    """
    if ranks < 1 or rows_per_rank < 1:
        raise ValueError(f"balance: ranks={ranks} and rows_per_rank={rows_per_rank} must be >= 1")
    weight = [_balance_weight(model, s, padded_rows) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: (-weight[i], -samples[i].tokens, i))
    # Light: text-only and too cheap to move the balance (< 1% of a full row's LLM cost).
    light_below = 0.01 * row_tokens * model.per_token
    heavy = [i for i in order if samples[i].tiles or weight[i] >= light_below]
    light = sorted(set(order) - set(heavy), key=lambda i: (-samples[i].tokens, i))
    rows = _Rows(ranks, rows_per_rank, row_tokens, row_tiles)
    left_over = _deal(samples, weight, heavy, rows, step)
    left_over += _deal(samples, weight, light, rows, step, best_fit=True)
    cost = [
        sum(row_cost(model, [samples[i] for i in row], row_tokens, padded_rows) for row in rank)
        for rank in rows.samples
    ]
    return Assignment(rows.samples, sorted(left_over), cost)


def _deal(
    samples: Sequence[SampleMeta],
    weight: list[float],
    order: list[int],
    rows: _Rows,
    step: int,
    best_fit: bool = False,
) -> list[int]:
    """Each of `order` to the least-loaded rank that has room, into its least-loaded row (or
    `best_fit`: the row with the least room); returns the samples that fit nowhere."""
    ranks = len(rows.samples)
    # (load, rotated position, rank): the step rotates who receives the first, largest sample.
    heap = [(sum(rows.row_load[r]), (r - step) % ranks, r) for r in range(ranks)]
    heapq.heapify(heap)
    left_over = []
    for i in order:
        popped, placed = [], False
        while heap and not placed:
            load, position, rank = heapq.heappop(heap)
            fits = rows.fitting(rank, samples[i])
            if fits:
                if best_fit:
                    j = min(fits, key=lambda k: (rows.room[rank][k][0], k))
                else:
                    j = min(fits, key=lambda k: (rows.row_load[rank][k], k))
                rows.put(rank, j, i, samples[i], weight[i])
                load, placed = load + weight[i], True
            popped.append((load, position, rank))
        for entry in popped:
            heapq.heappush(heap, entry)
        if not placed:
            left_over.append(i)
    return left_over


def _balance_weight(model: CostModel, sample: SampleMeta, padded_rows: bool) -> float:
    """What a sample adds to its rank's time beyond what every row costs anyway."""
    if padded_rows:
        return sample.tiles * model.per_tile + sample.tokens**2 * model.per_token_squared
    return model.cost(sample)


def row_cost(
    model: CostModel, row: Sequence[SampleMeta], row_tokens: int, padded_rows: bool
) -> float:
    """FLOPs of one row: its samples, plus (padded rows) the padding as one more segment."""
    cost = sum(model.cost(s) for s in row)
    if padded_rows:
        pad = row_tokens - sum(s.tokens for s in row)
        cost += pad * model.per_token + pad**2 * model.per_token_squared
    return cost


def deal_in_order(
    samples: Sequence[SampleMeta], ranks: int, rows_per_rank: int, row_tokens: int, row_tiles: int
) -> Assignment:
    """The unbalanced deal: samples in stream order, each into the first row with room (rows
    rank by rank), as if every rank packed the next share of the stream. The loader's step
    takes exactly the samples this places, so balancing changes where a sample goes, never
    which samples make the global batch. `rank_cost` is left empty (see `rank_costs`)."""
    rows = _Rows(ranks, rows_per_rank, row_tokens, row_tiles)
    left_over = []
    for i, sample in enumerate(samples):
        spot = next(((r, j) for r in range(ranks) for j in rows.fitting(r, sample)[:1]), None)
        if spot is None:
            left_over.append(i)
        else:
            rows.put(*spot, i, sample, 0.0)
    return Assignment(rows.samples, left_over, [])


def rank_costs(
    deal: Assignment,
    samples: Sequence[SampleMeta],
    model: CostModel,
    row_tokens: int,
    padded_rows: bool = True,
) -> list[float]:
    """Each rank's cost under `deal` (the rows' FLOPs, `row_cost`)."""
    return [
        sum(row_cost(model, [samples[i] for i in row], row_tokens, padded_rows) for row in rank)
        for rank in deal.rows
    ]


def max_over_mean(costs: Sequence[float]) -> float:
    """The slowest rank's cost over the mean: the step time lost to imbalance is this - 1."""
    mean = sum(costs) / len(costs)
    return max(costs) / mean if mean > 0 else 1.0


PARTNERS = 4
"""Least-loaded ranks `improve` tries per move (bounds its cost at DP 512)."""


def improve(
    deal: Assignment,
    samples: Sequence[SampleMeta],
    model: CostModel,
    row_tokens: int,
    row_tiles: int,
    padded_rows: bool = True,
) -> Assignment:
    """A feasible deal made more even by local moves: the most loaded rank gives a sample to
    one of the `PARTNERS` least loaded ranks, or swaps it for a lighter one of theirs, where the
    rows have room and the larger of the two rank costs (`row_cost`) drops; until no such move
    is left (at most 2 x ranks moves). For sets packed too tightly for `balance` to place."""
    rows = _RowCosts(deal, samples, model, row_tokens, row_tiles, padded_rows)
    for _ in range(2 * len(rows.rows)):
        high = max(range(len(rows.load)), key=lambda r: (rows.load[r], -r))
        partners = sorted(range(len(rows.load)), key=lambda r: (rows.load[r], r))
        move = next(
            (m for low in partners[:PARTNERS] if low != high and (m := rows.best_move(high, low))),
            None,
        )
        if move is None:
            break
        rows.apply(*move)
    return Assignment(rows.rows, list(deal.left_over), [])


class _RowCosts:
    """A deal's rows with their tokens, tiles and samples' cost, for `improve`'s moves."""

    def __init__(self, deal, samples, model, row_tokens, row_tiles, padded_rows) -> None:
        self.samples, self.model, self.padded = samples, model, padded_rows
        self.row_tokens, self.row_tiles = row_tokens, row_tiles
        self.cost = [model.cost(s) for s in samples]
        self.rows = [[list(row) for row in rank] for rank in deal.rows]
        self.used = [[self._used(row) for row in rank] for rank in self.rows]
        self.load = [sum(self._cost(*u) for u in rank) for rank in self.used]

    def _used(self, row: list[int]) -> tuple[int, int, float]:
        s = self.samples
        return (
            sum(s[i].tokens for i in row),
            sum(s[i].tiles for i in row),
            sum(self.cost[i] for i in row),
        )

    def _cost(self, tokens: int, tiles: int, cost: float) -> float:
        if not self.padded:
            return cost
        pad = self.row_tokens - tokens
        return cost + pad * self.model.per_token + pad**2 * self.model.per_token_squared

    def _after(self, used, i: int, k: int, sign: int) -> tuple[int, int, float] | None:
        """A row's (tokens, tiles, cost) after sample i leaves (sign -1) or enters (+1) and k
        (-1: none) does the opposite; None if it overflows."""
        s, t = self.samples[i], self.samples[k] if k >= 0 else SampleMeta(0, 0)
        cost_k = self.cost[k] if k >= 0 else 0.0
        tokens = used[0] + sign * (s.tokens - t.tokens)
        tiles = used[1] + sign * (s.tiles - t.tiles)
        if tokens > self.row_tokens or tiles > self.row_tiles:
            return None
        return tokens, tiles, used[2] + sign * (self.cost[i] - cost_k)

    def best_move(self, high: int, low: int):
        """(high, hj, i, low, lj, k, new high row, new low row) lowering max(load) the most."""
        best, peak = None, self.load[high]
        for hj, hrow in enumerate(self.rows[high]):
            for i in hrow:
                for lj, lrow in enumerate(self.rows[low]):
                    for k in [-1, *lrow]:
                        new_h = self._after(self.used[high][hj], i, k, -1)
                        new_l = self._after(self.used[low][lj], i, k, +1)
                        if new_h is None or new_l is None:
                            continue
                        h = self.load[high] - self._cost(*self.used[high][hj]) + self._cost(*new_h)
                        lo = self.load[low] - self._cost(*self.used[low][lj]) + self._cost(*new_l)
                        if max(h, lo) < peak:
                            best, peak = (high, hj, i, low, lj, k, new_h, new_l, h, lo), max(h, lo)
        return best

    def apply(self, high, hj, i, low, lj, k, new_h, new_l, h, lo) -> None:
        self.rows[high][hj].remove(i)
        self.rows[low][lj].append(i)
        if k >= 0:
            self.rows[low][lj].remove(k)
            self.rows[high][hj].append(k)
        self.used[high][hj], self.used[low][lj] = new_h, new_l
        self.load[high], self.load[low] = h, lo


class StepDeal:
    """The loader's deal of one training step (`data.balance`), on any stream of samples.

    The step takes, in stream order (last step's carry first), the samples that the unbalanced
    deal places: each into the first row with room, rank by rank, as if every rank packed the
    next share of the stream. Samples that find no room are carried, first in line, into the
    next step; the step closes after one miss per row (so the carry stays bounded). `balance`
    then deals that same set by cost, so the global batch, and the token-weighted loss over it,
    is what the unbalanced deal would train on. If it cannot place all of it (or comes out worse
    than the stream order), the step takes the unbalanced deal evened out by `improve` (never
    worse; counted in `fallbacks`). A pure function of the stream, the carry and
    `steps`: every rank computes the same deal, and a resumed run the same later ones.
    """

    balanced = True
    """False: keep the stream-order deal (the baseline the figures compare with)."""

    def __init__(
        self, model: CostModel, ranks: int, rows_per_rank: int, row_tokens: int, row_tiles: int
    ) -> None:
        self.model = model
        self.sizes = (ranks, rows_per_rank, row_tokens, row_tiles)
        self.carry: list[tuple[object, SampleMeta]] = []
        self.steps = self.fallbacks = 0
        self.figures: dict[str, float] | None = None

    def next(
        self, draw: Callable[[], tuple[object, SampleMeta] | None]
    ) -> tuple[list[object], Assignment]:
        """The next step's samples (their references, in stream order) and their deal;
        `draw()` gives the stream's next (reference, metadata), or None for an unusable one."""
        refs, samples, stream = self._candidates(draw)
        row_tokens = self.sizes[2]

        def spread(deal: Assignment) -> float:
            return max_over_mean(rank_costs(deal, samples, self.model, row_tokens))

        before = spread(stream)
        dealt = (
            balance(samples, self.model, *self.sizes, step=self.steps) if self.balanced else stream
        )
        if self.balanced and (dealt.left_over or spread(dealt) > before):  # too tight for it
            self.fallbacks += 1
            dealt = improve(stream, samples, self.model, *self.sizes[2:])
        self.figures = {
            "max_over_mean": spread(dealt),
            "stream_max_over_mean": before,
            "fallbacks": float(self.fallbacks),
        }
        self.steps += 1
        return refs, dealt

    def _candidates(
        self, draw: Callable[[], tuple[object, SampleMeta] | None]
    ) -> tuple[list[object], list[SampleMeta], Assignment]:
        ranks, rows_per_rank, row_tokens, row_tiles = self.sizes
        # First fit over the rows in rank order: tokens and tiles left per row.
        tokens = np.full(ranks * rows_per_rank, row_tokens, dtype=np.int64)
        tiles = np.full(ranks * rows_per_rank, row_tiles, dtype=np.int64)
        rows: list[list[list[int]]] = [[[] for _ in range(rows_per_rank)] for _ in range(ranks)]
        pending, refs, samples, carry = list(self.carry), [], [], []
        while len(carry) < len(tokens):
            item = pending.pop(0) if pending else draw()
            if item is None:
                continue
            sample = item[1]
            fits = (tokens >= sample.tokens) & (tiles >= sample.tiles)
            spot = int(fits.argmax())
            if not fits[spot]:
                carry.append(item)
                continue
            tokens[spot] -= sample.tokens
            tiles[spot] -= sample.tiles
            rows[spot // rows_per_rank][spot % rows_per_rank].append(len(samples))
            refs.append(item[0])
            samples.append(sample)
        self.carry = carry + pending
        return refs, samples, Assignment(rows, [], [])
