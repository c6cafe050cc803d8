"""The end-to-end loader: shards -> DALI tiles -> chat tokens -> packed rows -> micro-batches.

One `InternVLLoader` per data-parallel rank. Per step it draws samples from a mixture of
datasets, reads and checks them (`samples.read_sample`, the parser the validator uses), tiles
their images with DALI (`tiler.ImageTiler`), tokenizes the conversation
(`chat.tokenize_conversation`), packs (`packing.SequencePacker`) and yields micro-batches of
`micro_batch_size` rows in the form `training.step.internvl_forward_step` consumes (see
`InternVLLoader.__next__`).

Order and sharding. Each dataset's samples (all shards, in order) are permuted per epoch with a
seed of (seed, dataset, epoch); rank r of n takes positions r, r + n, r + 2n, ... of that order,
so ranks are disjoint and together cover the epoch. Datasets loop over epochs forever; which
dataset the next sample comes from is drawn with the dataset weights from a per-rank generator
seeded with (seed, rank).

Resume (skip-ahead, not DALI checkpointing). The reader is ours, so a position is exact and
cheap: (epoch, cursor) per dataset. `state_dict()` also holds the mixture generator's state,
the packer's open rows and closed-but-unused rows as sample references (dataset, epoch, sample
index), never as tensors (16 open rows of up to 48 uint8 tiles would be ~460 MB per rank). Loading
re-reads, re-tiles and re-tokenizes those few samples; the JPEG re-compression quality is a
function of the reference, so they come back bit-identical. DALI's `enable_checkpointing` would
cover the reader only, not the packer or the mixture, and pins the state to DALI's internals.
A state only fits the data-parallel layout it was saved with: each rank's position depends on
its own mixture draws, so positions cannot be re-dealt to another number of ranks exactly, and
loading into a different dp_size fails with an explanation.

Bad data. A sample the parser refuses (members missing or cut short, malformed JSON or
conversation, placeholder count, over a work limit of `LoaderConfig.sample`) or whose image
fails to decode is skipped, counted by reason and logged with shard and key. DALI cannot drop
one sample from a batch, so `ImageTiler` rebuilds its pipeline after a failure and retries that
batch image by image: only the bad sample is lost. When skips exceed `max_skip_fraction` of the
samples read (checked once `skip_check_after` samples were read), or when
`max_consecutive_drops` samples in a row were dropped for any reason (bad, filtered, over-long,
too many tiles: otherwise a stream where every sample is dropped would never yield a batch), the
loader raises `TooManyBadSamplesError`. Run `tools/validate_shards.py` before training so that
none of this happens.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from megatron_internvl.data.chat import DEFAULT_SYSTEM_PROMPT, IMG_CONTEXT, tokenize_conversation
from megatron_internvl.data.errors import BadSampleError, DataError
from megatron_internvl.data.packing import (
    LossReduction,
    PackedRow,
    PackingConfig,
    PackingStats,
    Sample,
    SequencePacker,
    collate_rows,
)
from megatron_internvl.data.pixels import BatchBuffers, normalize_tiles
from megatron_internvl.data.samples import POLICY_REASONS, SampleConfig, read_sample
from megatron_internvl.data.shard_index import SampleEntry, ensure_index, read_index
from megatron_internvl.data.shard_index import shard_list as shard_list  # the loop finds it here
from megatron_internvl.data.shard_reader import ShardReader
from megatron_internvl.data.tiler import ImageDecodeError, ImageJob, ImageTiler, TilerConfig
from megatron_internvl.data.tiling import per_image_cap

log = logging.getLogger(__name__)

STATE_VERSION = 1
SampleRef = tuple[int, int, int]
"""(dataset index, epoch, sample index in the dataset): enough to rebuild a sample exactly."""


class TooManyBadSamplesError(RuntimeError):
    """More samples were skipped than the configured fraction (or run length) allows."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a mixture: its shards (each with a `.idx` next to it) and its weight."""

    name: str
    shards: tuple[str, ...]
    weight: float = 1.0
    video_frames: tuple[int, int] | None = None
    """Frames per video sample drawn from this range in this dataset; None: the loader's
    (`LoaderConfig.sample.video_frames`)."""


@dataclass(frozen=True)
class LoaderConfig:
    """Everything the loader needs besides the datasets and the tokenizer."""

    seq_length: int = 16384
    micro_batch_size: int = 1
    """Rows per micro-batch (the training step runs them as one row of b * seq_length tokens)."""
    pad_to_multiple: int = 1
    """Each sample occupies a multiple of this many tokens (2 x CP; see `packing`)."""
    max_tiles_per_row: int = 48
    max_tiles_per_sample: int = 48
    open_rows: int = 16
    loss_reduction: LossReduction = "square"
    tokens_per_tile: int = 256
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    add_bos: bool = False
    shuffle: bool = True
    seed: int = 1234
    read_ahead: int = 32
    """Samples read, tiled and packed together (DALI batches images of several samples; the
    stream does not depend on it)."""
    max_skip_fraction: float = 0.01
    skip_check_after: int = 1000
    epochs: int | None = None
    """Stop after this many passes over the (single) dataset, the last rows flushed and the
    last micro-batch filled up with all-padding rows; None loops forever (training)."""
    max_consecutive_drops: int = 200
    """Stop with an error after this many samples in a row were dropped (any reason)."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    """Layouts, caption prompts and filters, and the work limits per sample."""
    tiler: TilerConfig = field(default_factory=TilerConfig)


@dataclass
class Loaded:
    """The payload a packed sample carries: where it came from and its tiles."""

    ref: SampleRef
    name: str
    tiles: list[torch.Tensor]
    """uint8 tiles_u8 of each image, in placeholder order (normalised into one float tensor
    per micro-batch, in `collate`)."""


RECENT_DROPS = 5
"""Dropped samples an error names (the most recent)."""


def dataset_sample_config(cfg: LoaderConfig, dataset: DatasetSpec) -> SampleConfig:
    """The sample settings of one dataset: the loader's, with the dataset's own frame range."""
    return replace(cfg.sample, video_frames=dataset.video_frames or cfg.sample.video_frames)


class InternVLLoader:
    """Infinite iterator of micro-batches for one data-parallel rank; see the module docstring."""

    def __init__(
        self,
        datasets: Sequence[DatasetSpec],
        tokenizer: Any,
        cfg: LoaderConfig,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        if not datasets:
            raise ValueError("loader: no datasets given")
        if cfg.epochs is not None and len(datasets) != 1:
            raise ValueError(
                f"loader: epochs={cfg.epochs} needs exactly one dataset, got {len(datasets)}; "
                "list every shard of a finite set in one DatasetSpec"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"loader: need 0 <= dp_rank < dp_size, got {dp_rank}, {dp_size}")
        weights = np.asarray([d.weight for d in datasets], dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"loader: dataset weights must be >= 0, not all 0; got {weights}")
        self.datasets = list(datasets)
        self.weights = weights / weights.sum()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.entries: list[list[SampleEntry]] = []
        for spec in datasets:
            for shard in spec.shards:
                ensure_index(shard)  # a folder of plain WebDataset tars gets its indexes here
            entries = [e for shard in spec.shards for e in read_index(shard)]
            if len(entries) < dp_size:
                raise DataError(
                    f"loader: dataset {spec.name} has {len(entries)} sample(s), fewer than the "
                    f"{dp_size} data-parallel ranks; add data or lower its dp size"
                )
            self.entries.append(entries)
        # Per dataset: its own frame range, if it has one (SampleConfig validates it).
        self.sample_configs = [dataset_sample_config(cfg, d) for d in datasets]
        self.reader = ShardReader()
        self.tiler = ImageTiler(cfg.tiler)
        self.batch_buffers = BatchBuffers()  # float micro-batches' memory, recycled
        self.packer = SequencePacker(
            PackingConfig(
                seq_length=cfg.seq_length,
                max_tiles_per_row=cfg.max_tiles_per_row,
                open_rows=cfg.open_rows,
                loss_reduction=cfg.loss_reduction,
                pad_token_id=tokenizer.pad_token_id or 0,
                pad_to_multiple=cfg.pad_to_multiple,
            )
        )
        self.image_context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.positions = [[0, 0] for _ in datasets]  # (epoch, cursor in this rank's slice)
        self.mixture = np.random.default_rng([cfg.seed, dp_rank])
        self.ready: list[PackedRow] = []
        self.seen = 0
        self.skips: Counter = Counter()
        self.recent_drops: list[str] = []
        self.consecutive_drops = 0
        self.micro_batches = 0
        self.exhausted = False
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    # --- order ---------------------------------------------------------------------------
    def _order(self, dataset: int, epoch: int) -> np.ndarray:
        """Sample indices of this rank's slice of `epoch`, in reading order."""
        key = (dataset, epoch)
        if key not in self._orders:
            n = len(self.entries[dataset])
            if self.cfg.shuffle:
                order = np.random.default_rng([self.cfg.seed, dataset, epoch]).permutation(n)
            else:
                order = np.arange(n)
            if len(self._orders) > 4 * len(self.datasets):
                self._orders.clear()  # only the current epochs are needed
            self._orders[key] = order[self.dp_rank :: self.dp_size]
        return self._orders[key]

    def epoch_order(self, dataset: int, epoch: int) -> list[str]:
        """`<shard>:<key>` of the samples this rank reads from `dataset` in `epoch`, in order."""
        return [self.entries[dataset][i].name for i in self._order(dataset, epoch)]

    def _next_ref(self) -> SampleRef | None:
        """The next sample's reference, or None once a finite stream (`epochs`) has ended."""
        if self.cfg.epochs is not None and self.positions[0][0] >= self.cfg.epochs:
            return None
        if len(self.datasets) == 1:
            dataset = 0
        else:
            dataset = int(self.mixture.choice(len(self.datasets), p=self.weights))
        epoch, cursor = self.positions[dataset]
        order = self._order(dataset, epoch)
        ref = (dataset, epoch, int(order[cursor]))
        cursor += 1
        if cursor == len(order):
            epoch, cursor = epoch + 1, 0
        self.positions[dataset] = [epoch, cursor]
        return ref

    # --- samples ---------------------------------------------------------------------------
    def _quality(self, ref: SampleRef, num_images: int) -> list[int]:
        low, high = self.cfg.tiler.jpeg_quality or (100, 100)
        rng = np.random.default_rng([self.cfg.seed, *ref])
        return [int(q) for q in rng.integers(low, high + 1, size=num_images)]

    def _materialize(self, refs: Sequence[SampleRef]) -> list[Sample | BadSampleError]:
        """Read, tile and tokenize samples; a `BadSampleError` in place of each one that fails."""
        raws: list[Any] = []
        jobs: list[ImageJob] = []
        for ref in refs:
            entry = self.entries[ref[0]][ref[2]]
            try:
                raw = read_sample(self.reader, entry, self.sample_configs[ref[0]])
            except BadSampleError as error:
                raws.append(error)
                continue
            # InternVL tiles a video frame into one tile, no thumbnail.
            video = raw.layout == "video"
            cap = 1 if video else per_image_cap(self.cfg.tiler.max_num, max(1, len(raw.images)))
            qualities = self._quality(ref, len(raw.images))
            jobs += [ImageJob(d, cap, q, video) for d, q in zip(raw.images, qualities, strict=True)]
            raws.append(raw)
        tiles = iter(self.tiler.tile(jobs))
        out: list[Sample | BadSampleError] = []
        for ref, raw in zip(refs, raws, strict=True):
            if isinstance(raw, BadSampleError):
                out.append(raw)
                continue
            per_image = [next(tiles) for _ in raw.images]
            out.append(self._to_sample(ref, raw, per_image))
        return out

    def _to_sample(self, ref: SampleRef, raw: Any, per_image: list) -> Sample | BadSampleError:
        for i, result in enumerate(per_image):
            if isinstance(result, ImageDecodeError):
                return BadSampleError(raw.name, "corrupt image", f"image {i}: {result}")
        num_tiles = sum(t.shape[0] for t in per_image)
        if num_tiles > self.cfg.max_tiles_per_sample:
            return BadSampleError(
                raw.name,
                "too many tiles",
                f"{num_tiles} tiles > max_tiles_per_sample={self.cfg.max_tiles_per_sample}",
            )
        try:
            input_ids, labels = tokenize_conversation(
                raw.conversations,
                [t.shape[0] for t in per_image],
                self.tokenizer,
                tokens_per_tile=self.cfg.tokens_per_tile,
                system_prompt=self.cfg.system_prompt,
                add_bos=self.cfg.add_bos,
                key=raw.name,
            )
        except (ValueError, KeyError, TypeError) as error:
            return BadSampleError(raw.name, "placeholder mismatch", str(error))
        return Sample(input_ids, labels, num_tiles, Loaded(ref, raw.name, per_image))

    def _skip(self, bad: BadSampleError) -> None:
        self.skips[bad.reason] += 1
        log.warning("skipping %s", bad)
        self._dropped(str(bad))
        bad_count = sum(n for r, n in self.skips.items() if r not in POLICY_REASONS)
        if (
            self.seen >= self.cfg.skip_check_after
            and bad_count > self.cfg.max_skip_fraction * self.seen
        ):
            raise TooManyBadSamplesError(
                f"data-parallel rank {self.dp_rank}: skipped {bad_count} of {self.seen} samples "
                f"({dict(self.skips)}), more than max_skip_fraction={self.cfg.max_skip_fraction}; "
                f"last: {bad}. Check the shards with tools/validate_shards.py (--clean-dir writes "
                "shards without the bad samples)"
            )

    def _dropped(self, what: str) -> None:
        """Count one more dropped sample in a row; stop when a stream yields nothing."""
        self.recent_drops = [*self.recent_drops[-(RECENT_DROPS - 1) :], what]
        self.consecutive_drops += 1
        if self.consecutive_drops >= self.cfg.max_consecutive_drops:
            stats = self.packer.stats
            reasons = {
                **self.skips,
                "over seq_length": stats.dropped_overlong,
                "over max_tiles_per_row": stats.dropped_too_many_tiles,
            }
            raise TooManyBadSamplesError(
                f"data-parallel rank {self.dp_rank}: the last {self.consecutive_drops} samples "
                f"were all dropped (max_consecutive_drops={self.cfg.max_consecutive_drops}); "
                f"reasons so far { ({r: n for r, n in reasons.items() if n}) }; last: "
                f"{'; '.join(self.recent_drops)}. Check the shards with tools/validate_shards.py "
                "and the limits (data.seq_length, tile caps, data.max_* keys)"
            )

    def _fill(self) -> None:
        refs = [ref for ref in (self._next_ref() for _ in range(self.cfg.read_ahead)) if ref]
        if not refs:  # a finite stream ended: its last rows leave the packer
            self.ready += self.packer.flush()
            self.exhausted = True
            return
        for sample in self._materialize(refs):
            self.seen += 1
            if isinstance(sample, BadSampleError):
                self._skip(sample)
                continue
            packed = self.packer.stats.samples_packed
            self.ready += self.packer.add(sample)
            if self.packer.stats.samples_packed == packed:
                self._dropped(f"{sample.payload.name}: dropped by the packer")
            else:
                self.consecutive_drops = 0

    # --- iteration -------------------------------------------------------------------------
    def __iter__(self) -> InternVLLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        """The next micro-batch.

        Keys: `tokens`, `labels` (shifted, -100 where unsupervised), `loss_mask` (float
        per-token weights), `position_ids` [b, s] int64; `cu_seqlens` int32 real lengths and
        `cu_seqlens_padded` int32 boundaries over the b * s flattened tokens; `max_seqlen`;
        `tile_counts` per sub-sample; `images`
        [tiles, 3, S, S] float32 in the order of the `<IMG_CONTEXT>` runs (None without
        images); `sample_keys` (`<shard>:<key>` per sub-sample).
        """
        return self.collate(self.next_rows())

    def next_rows(self) -> list[PackedRow]:
        """The rows of the next micro-batch, before `collate` (the loader's state moves on).

        A finite stream (`epochs`) raises StopIteration when it has no rows left; its last
        micro-batch is filled up with all-padding rows (loss weight 0).
        """
        size = self.cfg.micro_batch_size
        while len(self.ready) < size and not self.exhausted:
            self._fill()
        if not self.ready:
            raise StopIteration
        rows = self.ready[:size]
        del self.ready[:size]
        rows += [self.packer.build_row([]) for _ in range(size - len(rows))]
        self.micro_batches += 1
        return rows

    def collate(self, rows: Sequence[PackedRow]) -> dict[str, Any]:
        """The micro-batch of `next_rows`' rows (may run on another thread, one at a time: it
        touches only the float batches' recycled memory)."""
        batch: dict[str, Any] = collate_rows(rows)
        batch["loss_mask"] = batch.pop("loss_weights")
        payloads = [p for row in rows for p in row.payloads]
        tiles = [t for p in payloads for t in p.tiles]
        batch["images"] = normalize_tiles(tiles, self.batch_buffers) if tiles else None
        batch["sample_keys"] = [p.name for p in payloads]
        return batch

    def close(self) -> None:
        """Close the shard files this loader holds open and release its decoders."""
        self.reader.close()
        self.tiler.close()

    @property
    def packing_stats(self) -> PackingStats:
        """The packer's counters (fill rate, drops)."""
        return self.packer.stats

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's position: plain Python data (JSON-able), no tensors."""
        return {
            "version": STATE_VERSION,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "seed": self.cfg.seed,
            "datasets": [
                (d.name, len(e)) for d, e in zip(self.datasets, self.entries, strict=True)
            ],
            "positions": [list(p) for p in self.positions],
            "mixture": self.mixture.bit_generator.state,
            "open_rows": [[list(s.payload.ref) for s in row] for row in self.packer.open_rows()],
            "ready_rows": [[list(p.ref) for p in row.payloads] for row in self.ready],
            "packing_stats": asdict(self.packer.stats),
            "seen": self.seen,
            "skips": dict(self.skips),
            "micro_batches": self.micro_batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` (from `state_dict` of the same rank) left off."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state version {state.get('version')} != {STATE_VERSION}; it was written "
                "by another version of the loader"
            )
        if (state["dp_rank"], state["dp_size"]) != (self.dp_rank, self.dp_size):
            raise ValueError(
                f"loader state was saved by data-parallel rank {state['dp_rank']} of "
                f"{state['dp_size']}, this loader is rank {self.dp_rank} of {self.dp_size}. Each "
                "rank's position depends on its own mixture draws, so positions cannot be re-dealt "
                f"exactly to another number of ranks: resume with dp_size={state['dp_size']}, or "
                "start the data stream afresh (skip loading the loader state, change the seed)"
            )
        if "balance" in state and not hasattr(self, "dealer"):
            raise ValueError(
                "loader state was saved with data.balance=true (one global stream dealt by "
                "cost), this loader reads a strided share; resume with data.balance=true"
            )
        here = [(d.name, len(e)) for d, e in zip(self.datasets, self.entries, strict=True)]
        if [tuple(d) for d in state["datasets"]] != here or state["seed"] != self.cfg.seed:
            raise ValueError(
                f"loader state is for datasets {state['datasets']} with seed {state['seed']}, "
                f"this loader has {here} with seed {self.cfg.seed}; resume with the same data "
                "mixture (same shards, same order) and seed"
            )
        self.positions = [list(p) for p in state["positions"]]
        self.mixture.bit_generator.state = state["mixture"]
        self.seen = state["seen"]
        self.skips = Counter(state["skips"])
        self.micro_batches = state["micro_batches"]
        self.exhausted = False
        rows = [[tuple(r) for r in row] for row in state["open_rows"] + state["ready_rows"]]
        flat = [ref for row in rows for ref in row]
        samples = iter(self._materialize(flat))
        rebuilt = [[next(samples) for _ in row] for row in rows]
        for sample in (s for row in rebuilt for s in row):
            if isinstance(sample, BadSampleError):
                raise ValueError(
                    f"loader state: {sample}; this sample was packed when the state was saved, so "
                    "the shards changed since; resume with the shards the state was saved with"
                )
        n_open = len(state["open_rows"])
        self.packer.restore(rebuilt[:n_open], PackingStats(**state["packing_stats"]))
        self.ready = [self.packer.build_row(row) for row in rebuilt[n_open:]]
