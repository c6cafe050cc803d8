"""The loader with tile-aware data-parallel balancing (`data.balance`).

Without balancing each rank reads its own strided share of every epoch and packs it; ranks end
up with very different work (tiles, per-sample len^2). Here every rank draws the same global
stream (the full epoch order of each dataset and a mixture generator seeded with the seed
only), so all of them know each step's candidates without communicating. A step takes, in
stream order, the samples that the unbalanced deal (`balance.deal_in_order`: first row with
room, rank by rank) places into the step's rows (data-parallel ranks x rows per rank); those
that find no room yet are carried, first in line, into the next step (at most one look-ahead
miss per row, so the carry is bounded). `balance.balance` then deals that same set to ranks and
rows by cost: the global batch, hence the token-weighted loss, is the one the unbalanced deal
would train on; if the balanced deal cannot place all of it, the step keeps the unbalanced
deal (counted). The tile and token counts come from `sample_meta` (headers and text, no pixel
decoded), so each rank then decodes only its own samples.

State: the global stream position and mixture state, the carry, the step count (it rotates
the deal's tie order) and this rank's rows of the current step as sample references; a resumed
run recomputes every later deal exactly. Like the strided loader's, a state fits only the
data-parallel size it was saved with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_internvl.data.balance import (
    Assignment,
    CostModel,
    SampleMeta,
    balance,
    deal_in_order,
    max_over_mean,
    rank_costs,
)
from megatron_internvl.data.errors import BadSampleError
from megatron_internvl.data.loader import DatasetSpec, InternVLLoader, LoaderConfig, SampleRef
from megatron_internvl.data.packing import PackedRow, Sample
from megatron_internvl.data.sample_meta import MetaSettings, shard_meta


class StepRows(list):
    """A micro-batch's rows, with the step's balance figures for the logs."""

    balance: dict[str, float] | None = None


class BalancedLoader(InternVLLoader):
    """Micro-batches of one data-parallel rank, the step's samples dealt by cost."""

    def __init__(
        self,
        datasets: Sequence[DatasetSpec],
        tokenizer: Any,
        cfg: LoaderConfig,
        dp_rank: int,
        dp_size: int,
        cost: CostModel,
        rows_per_rank: int,
    ) -> None:
        if cfg.epochs is not None:
            raise ValueError("loader: data.balance deals training steps; epochs must be None")
        if rows_per_rank < 1 or rows_per_rank % cfg.micro_batch_size:
            raise ValueError(
                f"loader: rows per rank per step ({rows_per_rank}) must be a positive multiple "
                f"of micro_batch_size={cfg.micro_batch_size}"
            )
        super().__init__(datasets, tokenizer, cfg, dp_rank, dp_size)
        self.cost, self.rows_per_rank = cost, rows_per_rank
        self.mixture = np.random.default_rng([cfg.seed])  # the same draws on every rank
        settings = MetaSettings(
            sample=cfg.sample,
            image_size=cfg.tiler.image_size,
            max_tiles_per_image=cfg.tiler.max_num,
            min_tiles=cfg.tiler.min_num,
            use_thumbnail=cfg.tiler.use_thumbnail,
            tokens_per_tile=cfg.tokens_per_tile,
            system_prompt=cfg.system_prompt,
            add_bos=cfg.add_bos,
        )
        self.meta = [
            [m for shard in spec.shards for m in shard_meta(shard, settings, tokenizer)]
            for spec in datasets
        ]
        self.carry: list[SampleRef] = []
        self.steps = 0
        self.fallbacks = 0
        self.step_balance: dict[str, float] | None = None

    def _order(self, dataset: int, epoch: int) -> np.ndarray:
        """The whole epoch order (every rank reads the same global stream)."""
        key = (dataset, epoch)
        if key not in self._orders:
            n = len(self.entries[dataset])
            rng = np.random.default_rng([self.cfg.seed, dataset, epoch])
            if len(self._orders) > 4 * len(self.datasets):
                self._orders.clear()
            self._orders[key] = rng.permutation(n) if self.cfg.shuffle else np.arange(n)
        return self._orders[key]

    # --- the step's candidates and deal ---------------------------------------------------
    def _sample_meta(self, ref: SampleRef) -> SampleMeta | None:
        """The sample's tiles and padded tokens, or None (counted) when it cannot be used."""
        found = self.meta[ref[0]][ref[2]]
        name = self.entries[ref[0]][ref[2]].name
        if isinstance(found, str):
            self._skip(BadSampleError(name, found, "found before decoding"))
            return None
        tiles, tokens = found
        stats = self.packer.stats
        if tiles > self.cfg.max_tiles_per_sample:
            self._skip(BadSampleError(name, "too many tiles", f"{tiles} tiles"))
        elif tiles > self.cfg.max_tiles_per_row:
            stats.dropped_too_many_tiles += 1
            self._dropped(f"{name}: over max_tiles_per_row")
        elif tokens > self.cfg.seq_length:
            stats.dropped_overlong += 1
            self._dropped(f"{name}: over seq_length")
        else:
            self.consecutive_drops = 0
            return SampleMeta(tiles, self.packer.padded_length(tokens))
        return None

    def _candidates(self) -> tuple[list[SampleRef], list[SampleMeta]]:
        """The step's samples in stream order (carry first): those the unbalanced deal places;
        the rest (at most one miss per row) becomes the next carry."""
        ranks, rows = self.dp_size, self.rows_per_rank
        room = [[self.cfg.seq_length, self.cfg.max_tiles_per_row] for _ in range(ranks * rows)]
        pending, refs, metas, carry = list(self.carry), [], [], []
        while len(carry) < ranks * rows:
            if pending:
                ref = pending.pop(0)
            else:
                ref, self.seen = self._next_ref(), self.seen + 1
            assert ref is not None  # the training stream is endless
            meta = self._sample_meta(ref)
            if meta is None:
                continue
            spot = next((r for r in room if r[0] >= meta.tokens and r[1] >= meta.tiles), None)
            if spot is None:
                carry.append(ref)
                continue
            spot[0] -= meta.tokens
            spot[1] -= meta.tiles
            refs.append(ref)
            metas.append(meta)
        self.carry = carry + pending
        return refs, metas

    def deal(self, metas: list[SampleMeta]) -> Assignment:
        """The balanced deal of the step's samples, or the unbalanced one if it leaves any."""
        sizes = (self.dp_size, self.rows_per_rank, self.cfg.seq_length, self.cfg.max_tiles_per_row)
        stream = deal_in_order(metas, *sizes)
        dealt = balance(metas, self.cost, *sizes, step=self.steps)
        if dealt.left_over:
            self.fallbacks += 1
            dealt = stream
        self.step_balance = {
            "max_over_mean": max_over_mean(rank_costs(dealt, metas, self.cost, sizes[2])),
            "stream_max_over_mean": max_over_mean(rank_costs(stream, metas, self.cost, sizes[2])),
            "fallbacks": float(self.fallbacks),
        }
        return dealt

    def _next_step(self) -> None:
        refs, metas = self._candidates()
        mine = self.deal(metas).rows[self.dp_rank]
        flat = [refs[i] for row in mine for i in row]
        samples = iter(self._materialize(flat))
        self.ready = [self._build([next(samples) for _ in row]) for row in mine]
        self.steps += 1

    def _build(self, materialized: list[Sample | BadSampleError]) -> PackedRow:
        """One dealt row (a sample that failed to decode is skipped and counted)."""
        samples = []
        for sample in materialized:
            if isinstance(sample, BadSampleError):
                self._skip(sample)
            else:
                samples.append(sample)
        stats = self.packer.stats
        stats.samples_in += len(samples)
        stats.samples_packed += len(samples)
        stats.rows += 1
        stats.tokens += sum(len(s.input_ids) for s in samples)
        stats.layout_padding += sum(
            self.packer.padded_length(len(s.input_ids)) - len(s.input_ids) for s in samples
        )
        return self.packer.build_row(samples)

    # --- iteration and state ----------------------------------------------------------------
    def next_rows(self) -> list[PackedRow]:
        """The next micro-batch's rows of this rank (a new step's deal when the last is used)."""
        if not self.ready:
            self._next_step()
        size = self.cfg.micro_batch_size
        rows = StepRows(self.ready[:size])
        rows.balance = self.step_balance
        del self.ready[:size]
        self.micro_batches += 1
        return rows

    def collate(self, rows: Sequence[PackedRow]) -> dict[str, Any]:
        """`InternVLLoader.collate`, with the step's balance figures (`balance`) for the logs."""
        batch = InternVLLoader.collate(rows)
        batch["balance"] = getattr(rows, "balance", None)
        return batch

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["balance"] = {
            "carry": [list(ref) for ref in self.carry],
            "steps": self.steps,
            "fallbacks": self.fallbacks,
            "rows_per_rank": self.rows_per_rank,
            "step_balance": self.step_balance,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("balance")
        if saved is None or saved["rows_per_rank"] != self.rows_per_rank:
            was = "without data.balance" if saved is None else f"{saved['rows_per_rank']} rows"
            raise ValueError(
                f"loader state: saved {was}, this run deals {self.rows_per_rank} rows per rank "
                "per step with data.balance=true; resume with the settings it was saved with, "
                "or start the data stream afresh"
            )
        super().load_state_dict(state)
        self.carry = [tuple(ref) for ref in saved["carry"]]
        self.steps, self.fallbacks = saved["steps"], saved["fallbacks"]
        self.step_balance = saved["step_balance"]
