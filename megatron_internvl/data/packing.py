"""Sequence packing: tokenized samples -> rows of `seq_length` tokens with per-sample metadata.

Several samples share one row; attention stays inside each sub-sample (`cu_seqlens`) and position
ids restart at 0 in each. A row also respects a cap on image tiles, since the ViT cost of a row
is its tile count, not its token count.

Algorithm: best-fit over a small buffer of open rows. A sample goes to the open row with the
least room that still fits it (tokens and tiles); if none fits, a new row opens, and when more
than `open_rows` are open the fullest one is emitted. The buffer bounds memory and reordering
while letting short samples fill the gaps of earlier rows.

Labels come out shifted per sub-sample: `labels[t]` is the target of the prediction at position
t (Megatron's convention, so the loss does no shift). Shifting after packing would make the last
token of one sample predict the first token of the next.

Loss weights: for a sub-sample with x supervised tokens (counted on the shifted labels; the
same count, as a sample never supervises its first token) every supervised token weighs 1
("token"), 1/x ("sample") or x**-0.5 ("square", InternVL 2.5's default); the loss is
sum(w * CE) / sum(w). Padding fills the tail of a row as its own final segment, with label -100
and weight 0.

Layout padding: context parallelism splits every sub-sample into 2 x CP chunks (FP8 kernels want
multiples of 16), so with `pad_to_multiple` = k each sample occupies its length rounded up to a
multiple of k; the extra tokens (label -100, weight 0) follow the sample's last token, so causal
attention never lets a real token see them. `cu_seqlens` holds the real lengths, and
`cu_seqlens_padded` where each sample lies in the row (Megatron/TE's THD convention).
`PackingStats.fill_rate` counts real tokens only: the layout padding is reported as waste.

Over-long samples (more than `seq_length` tokens) are dropped by default: cutting one in the
middle would cut an image's `<IMG_CONTEXT>` run (the ViT tokens would no longer match) or an
answer before its `<|im_end|>`. `overlong="truncate"` keeps the head when the cut falls after
the last image token (it needs `image_context_id`) and drops the sample otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

IGNORE_INDEX = -100
LossReduction = Literal["token", "sample", "square"]


@dataclass(frozen=True)
class PackingConfig:
    """How rows are built."""

    seq_length: int = 16384
    max_tiles_per_row: int = 48
    open_rows: int = 16
    """Rows held open while looking for a fit; more packs tighter but reorders more."""
    loss_reduction: LossReduction = "square"
    overlong: Literal["drop", "truncate"] = "drop"
    image_context_id: int | None = None
    """Id of <IMG_CONTEXT>; needed by overlong="truncate" to avoid cutting image tokens."""
    pad_token_id: int = 0
    pad_to_multiple: int = 1
    """Each sample occupies a multiple of this many tokens (2 x CP, 16 for FP8; see above)."""

    def __post_init__(self) -> None:
        if self.loss_reduction not in ("token", "sample", "square"):
            raise ValueError(
                f"packing: loss_reduction={self.loss_reduction!r}; use 'token', 'sample' or "
                "'square'"
            )
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"packing: overlong={self.overlong!r}; use 'drop' or 'truncate'")
        if self.overlong == "truncate" and self.image_context_id is None:
            raise ValueError(
                "packing: overlong='truncate' needs image_context_id (the <IMG_CONTEXT> id) so "
                "that a cut never splits an image's tokens"
            )
        if self.pad_to_multiple < 1 or self.seq_length % self.pad_to_multiple:
            raise ValueError(
                f"packing: seq_length={self.seq_length} must be a multiple of "
                f"pad_to_multiple={self.pad_to_multiple} (>= 1)"
            )
        if self.seq_length < 2 or self.open_rows < 1 or self.max_tiles_per_row < 0:
            raise ValueError(
                f"packing: need seq_length >= 2, open_rows >= 1, max_tiles_per_row >= 0; got "
                f"{self.seq_length}, {self.open_rows}, {self.max_tiles_per_row}"
            )


@dataclass
class Sample:
    """One tokenized sample; labels unshifted (-100 where not supervised), as `chat` makes them."""

    input_ids: Sequence[int]
    labels: Sequence[int]
    num_tiles: int = 0
    payload: Any = None
    """Carried along untouched (e.g. the sample's tiles_nchw), in row order."""


@dataclass
class PackedRow:
    """One row of `seq_length` tokens; arrays are [seq_length] unless said otherwise."""

    input_ids: np.ndarray
    labels: np.ndarray
    """Shifted targets: labels[t] is what position t predicts; -100 where not supervised."""
    loss_weights: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray
    """[segments + 1] int32 offsets of the real tokens (the row's tail padding, if any, is the
    last segment and counts as real there)."""
    cu_seqlens_padded: np.ndarray
    """[segments + 1] int32 offsets of each segment in the row (with layout padding)."""
    tile_counts: list[int]
    """Tiles of each sub-sample, in order (padding excluded)."""
    payloads: list[Any]
    num_tokens: int
    """Tokens that are not padding."""

    @property
    def num_tiles(self) -> int:
        """Tiles in the row."""
        return sum(self.tile_counts)


def loss_weights(shifted_labels: np.ndarray, reduction: LossReduction) -> np.ndarray:
    """Per-token weights of one sub-sample: 0 where unsupervised, else 1, 1/x or x**-0.5."""
    supervised = shifted_labels != IGNORE_INDEX
    x = int(supervised.sum())
    if x == 0:
        return np.zeros(shifted_labels.shape, dtype=np.float32)
    per_token = {"token": 1.0, "sample": 1.0 / x, "square": x**-0.5}[reduction]
    return np.where(supervised, np.float32(per_token), np.float32(0.0)).astype(np.float32)


@dataclass(eq=False)  # rows are found by identity: comparing values compares token arrays
class _OpenRow:
    samples: list[Sample] = field(default_factory=list)
    tokens: int = 0
    tiles: int = 0


@dataclass
class PackingStats:
    """Counters for logs: what came in, what went out, what was lost."""

    seq_length: int
    samples_in: int = 0
    samples_packed: int = 0
    dropped_overlong: int = 0
    dropped_too_many_tiles: int = 0
    truncated: int = 0
    rows: int = 0
    tokens: int = 0
    layout_padding: int = 0
    """Tokens added to round samples up to `pad_to_multiple` (waste, like the rows' tails)."""

    @property
    def fill_rate(self) -> float:
        """Fraction of row positions holding real tokens (layout padding and tails count as
        waste)."""
        return self.tokens / max(1, self.rows * self.seq_length)


class SequencePacker:
    """Streaming best-fit packer: `add` samples, collect finished rows; `flush` at the end."""

    def __init__(self, cfg: PackingConfig) -> None:
        self.cfg = cfg
        self.open: list[_OpenRow] = []
        self.stats = PackingStats(seq_length=cfg.seq_length)

    def add(self, sample: Sample) -> list[PackedRow]:
        """Place one sample; returns the rows that this placement closed (zero or one)."""
        self.stats.samples_in += 1
        if len(sample.input_ids) != len(sample.labels):
            raise ValueError(
                f"packing: sample has {len(sample.input_ids)} ids but {len(sample.labels)} labels"
            )
        if sample.num_tiles > self.cfg.max_tiles_per_row:
            self.stats.dropped_too_many_tiles += 1
            return []
        if len(sample.input_ids) > self.cfg.seq_length:
            sample = self._truncate(sample)
            if sample is None:
                self.stats.dropped_overlong += 1
                return []
        self.stats.samples_packed += 1
        length = self.padded_length(len(sample.input_ids))
        self.stats.layout_padding += length - len(sample.input_ids)
        fits = [
            row
            for row in self.open
            if row.tokens + length <= self.cfg.seq_length
            and row.tiles + sample.num_tiles <= self.cfg.max_tiles_per_row
        ]
        if fits:
            row = min(fits, key=lambda r: self.cfg.seq_length - r.tokens)
        else:
            row = _OpenRow()
            self.open.append(row)
        row.samples.append(sample)
        row.tokens += length
        row.tiles += sample.num_tiles
        if row.tokens == self.cfg.seq_length:
            return [self._close(row)]
        if len(self.open) > self.cfg.open_rows:
            return [self._close(max(self.open, key=lambda r: r.tokens))]
        return []

    def padded_length(self, length: int) -> int:
        """Tokens a sample of `length` occupies in a row."""
        multiple = self.cfg.pad_to_multiple
        return -(-length // multiple) * multiple

    def flush(self) -> list[PackedRow]:
        """Close every open row, fullest first."""
        rows = sorted(self.open, key=lambda r: -r.tokens)
        return [self._close(row) for row in rows]

    def _truncate(self, sample: Sample) -> Sample | None:
        if self.cfg.overlong == "drop":
            return None
        ids = np.asarray(sample.input_ids)
        image_positions = np.flatnonzero(ids == self.cfg.image_context_id)
        # The cut keeps [0, seq_length); the image's </img> must survive too.
        if image_positions.size and image_positions[-1] + 1 >= self.cfg.seq_length:
            return None
        cut_labels = list(sample.labels[: self.cfg.seq_length])
        if all(label == IGNORE_INDEX for label in cut_labels[1:]):
            return None  # nothing left to learn from
        self.stats.truncated += 1
        return Sample(
            input_ids=list(sample.input_ids[: self.cfg.seq_length]),
            labels=cut_labels,
            num_tiles=sample.num_tiles,
            payload=sample.payload,
        )

    def open_rows(self) -> list[list[Sample]]:
        """The samples of each open row, in buffer order (what a loader saves to resume)."""
        return [list(row.samples) for row in self.open]

    def restore(self, rows: Sequence[Sequence[Sample]], stats: PackingStats) -> None:
        """Replace the buffer with rows saved by `open_rows` (same order) and the saved stats.

        Buffer order matters: best-fit and "emit the fullest" break ties by position.
        """
        self.open = [
            _OpenRow(
                samples=list(samples),
                tokens=sum(self.padded_length(len(s.input_ids)) for s in samples),
                tiles=sum(s.num_tiles for s in samples),
            )
            for samples in rows
        ]
        self.stats = stats

    def _close(self, row: _OpenRow) -> PackedRow:
        self.open.remove(row)
        self.stats.rows += 1
        self.stats.tokens += sum(len(s.input_ids) for s in row.samples)
        return self.build_row(row.samples)

    def build_row(self, samples: Sequence[Sample]) -> PackedRow:
        """Lay `samples` out in one row (no bookkeeping: also rebuilds a saved row)."""
        row = _OpenRow(samples=list(samples), tokens=sum(len(s.input_ids) for s in samples))
        seq = self.cfg.seq_length
        input_ids = np.full(seq, self.cfg.pad_token_id, dtype=np.int64)
        labels = np.full(seq, IGNORE_INDEX, dtype=np.int64)
        weights = np.zeros(seq, dtype=np.float32)
        position_ids = np.zeros(seq, dtype=np.int64)
        cu_seqlens, cu_padded = [0], [0]
        start = 0
        for sample in row.samples:
            n = len(sample.input_ids)
            end = start + n
            input_ids[start:end] = sample.input_ids
            shifted = np.full(n, IGNORE_INDEX, dtype=np.int64)
            shifted[:-1] = np.asarray(sample.labels, dtype=np.int64)[1:]
            labels[start:end] = shifted
            weights[start:end] = loss_weights(shifted, self.cfg.loss_reduction)
            occupied = self.padded_length(n)
            position_ids[start : start + occupied] = np.arange(occupied)
            cu_seqlens.append(cu_seqlens[-1] + n)
            start += occupied
            cu_padded.append(start)
        if start < seq:  # padding: its own segment, so no real token attends to it
            position_ids[start:] = np.arange(seq - start)
            cu_seqlens.append(cu_seqlens[-1] + seq - start)
            cu_padded.append(seq)
        return PackedRow(
            input_ids=input_ids,
            labels=labels,
            loss_weights=weights,
            position_ids=position_ids,
            cu_seqlens=np.asarray(cu_seqlens, dtype=np.int32),
            cu_seqlens_padded=np.asarray(cu_padded, dtype=np.int32),
            tile_counts=[s.num_tiles for s in row.samples],
            payloads=[s.payload for s in row.samples],
            num_tokens=row.tokens,
        )


def pack_samples(samples: Iterable[Sample], cfg: PackingConfig) -> Iterator[PackedRow]:
    """Pack a stream of samples into rows (a generator over `SequencePacker`)."""
    packer = SequencePacker(cfg)
    for sample in samples:
        yield from packer.add(sample)
    yield from packer.flush()


def collate_rows(rows: Sequence[PackedRow]) -> dict[str, torch.Tensor]:
    """Stack rows into a micro-batch.

    Returns tokens/labels/loss_weights/position_ids as [B, seq_length]; `cu_seqlens` [segments+1]
    int32 real (unpadded) lengths, cumulated over the rows, and `cu_seqlens_padded` where each
    segment lies in the flattened B * seq_length tokens, as a THD attention kernel expects;
    `max_seqlen` (0-dim); `tile_counts` [sub-samples] int64.
    """
    if not rows:
        raise ValueError("collate_rows: no rows")
    seq = len(rows[0].input_ids)
    real, padded = [rows[0].cu_seqlens[:1]], [rows[0].cu_seqlens_padded[:1]]
    for b, row in enumerate(rows):
        if len(row.input_ids) != seq:
            raise ValueError(f"collate_rows: row {b} has {len(row.input_ids)} tokens, not {seq}")
        real.append(row.cu_seqlens[1:] + real[-1][-1])
        padded.append(row.cu_seqlens_padded[1:] + b * seq)
    cu_seqlens = torch.from_numpy(np.concatenate(real).astype(np.int32))
    cu_seqlens_padded = torch.from_numpy(np.concatenate(padded).astype(np.int32))
    return {
        "tokens": torch.from_numpy(np.stack([r.input_ids for r in rows])),
        "labels": torch.from_numpy(np.stack([r.labels for r in rows])),
        "loss_weights": torch.from_numpy(np.stack([r.loss_weights for r in rows])),
        "position_ids": torch.from_numpy(np.stack([r.position_ids for r in rows])),
        "cu_seqlens": cu_seqlens,
        "cu_seqlens_padded": cu_seqlens_padded,
        "max_seqlen": torch.diff(cu_seqlens_padded).max(),
        "tile_counts": torch.tensor([t for r in rows for t in r.tile_counts], dtype=torch.int64),
    }
