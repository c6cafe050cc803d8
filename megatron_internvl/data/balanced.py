"""The loader with tile-aware data-parallel balancing (`data.balance`).

Without balancing each rank reads its own strided share of every epoch and packs it; ranks end
up with very different work (tiles, per-sample len^2). Here every rank draws the same global
stream (the full epoch order of each dataset, a mixture generator seeded with the seed only),
so all of them know each step's samples without communicating, and `balance.StepDeal` deals
them: the step's global batch is the one stream-order packing would make (the loss is
unchanged), placed on ranks and rows by cost. The tile and token counts come from
`sample_meta` (headers and text, no pixel decoded); each rank then decodes only its samples.

State: the global stream position and mixture state, the deal's carry and step count (it
rotates the deal's tie order) and this rank's rows of the current step as sample references;
a resumed run recomputes every later deal exactly. Like the strided loader's, a state fits
only the data-parallel size it was saved with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_internvl.data.balance import CostModel, SampleMeta, StepDeal
from megatron_internvl.data.errors import BadSampleError
from megatron_internvl.data.loader import (
    DatasetSpec,
    InternVLLoader,
    LoaderConfig,
    SampleRef,
    dataset_sample_config,
)
from megatron_internvl.data.packing import PackedRow, Sample
from megatron_internvl.data.sample_meta import Measured, MetaSettings, shard_meta


def meta_settings(cfg: LoaderConfig, dataset: DatasetSpec) -> MetaSettings:
    """What a dataset's tile and token counts depend on (its own video frame range included)."""
    return MetaSettings(
        sample=dataset_sample_config(cfg, dataset),
        image_size=cfg.tiler.image_size,
        max_tiles_per_image=cfg.tiler.max_num,
        min_tiles=cfg.tiler.min_num,
        use_thumbnail=cfg.tiler.use_thumbnail,
        tokens_per_tile=cfg.tokens_per_tile,
        system_prompt=cfg.system_prompt,
        add_bos=cfg.add_bos,
    )


def shard_jobs(datasets: Sequence[DatasetSpec]) -> list[tuple[int, int, str]]:
    """(dataset, shard number, shard path) of every shard, in dataset order."""
    return [(d, k, shard) for d, spec in enumerate(datasets) for k, shard in enumerate(spec.shards)]


def datasets_meta(
    datasets: Sequence[DatasetSpec], cfg: LoaderConfig, tokenizer: Any, start: int = 0
) -> list[list[Measured]]:
    """Per dataset, every sample's (tiles, tokens) or bad-sample reason, in index order. Shards
    are visited from number `start` on (cyclically): ranks starting at different shards build
    missing side files at the same time instead of waiting on one builder per file."""
    jobs = shard_jobs(datasets)
    found: dict[tuple[int, int], list[Measured]] = {}
    for n in range(len(jobs)):
        d, k, shard = jobs[(start + n) % len(jobs)]
        found[d, k] = shard_meta(shard, meta_settings(cfg, datasets[d]), tokenizer)
    return [
        [m for k in range(len(spec.shards)) for m in found[d, k]] for d, spec in enumerate(datasets)
    ]


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
        self.rows_per_rank = rows_per_rank
        self.mixture = np.random.default_rng([cfg.seed])  # the same draws on every rank
        self.meta = datasets_meta(datasets, cfg, tokenizer, start=dp_rank)
        sizes = (dp_size, rows_per_rank, cfg.seq_length, cfg.max_tiles_per_row)
        self.dealer = StepDeal(cost, *sizes)

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

    def _draw(self) -> tuple[SampleRef, SampleMeta] | None:
        """The stream's next sample with its metadata, or None when it cannot be used."""
        ref = self._next_ref()
        assert ref is not None  # the training stream is endless
        self.seen += 1
        meta = self._sample_meta(ref)
        return None if meta is None else (ref, meta)

    def _next_step(self) -> None:
        refs, dealt = self.dealer.next(self._draw)
        mine = dealt.rows[self.dp_rank]
        flat = [refs[i] for row in mine for i in row]
        samples = iter(self._materialize(flat))
        self.ready = [self._build([next(samples) for _ in row]) for row in mine]

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
        rows.balance = self.dealer.figures
        del self.ready[:size]
        self.micro_batches += 1
        return rows

    def collate(self, rows: Sequence[PackedRow]) -> dict[str, Any]:
        """`InternVLLoader.collate`, with the step's balance figures (`balance`) for the logs."""
        batch = super().collate(rows)
        batch["balance"] = getattr(rows, "balance", None)
        return batch

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        dealer = self.dealer
        state["balance"] = {
            "carry": [list(ref) for ref, _ in dealer.carry],
            "steps": dealer.steps,
            "fallbacks": dealer.fallbacks,
            "rows_per_rank": self.rows_per_rank,
            "figures": dealer.figures,
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
        dealer = self.dealer
        carry = [tuple(ref) for ref in saved["carry"]]
        dealer.carry = [(ref, self._sample_meta(ref)) for ref in carry]  # usable: carried
        dealer.steps, dealer.fallbacks = saved["steps"], saved["fallbacks"]
        dealer.figures = saved["figures"]
