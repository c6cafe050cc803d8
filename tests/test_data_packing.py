"""Packing keeps every sample intact in rows of seq_length, with its own segment, positions,
shifted labels and loss weights, within the tile cap, and fills rows to >= 97%."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_internvl.data.packing import (
    IGNORE_INDEX,
    PackingConfig,
    Sample,
    SequencePacker,
    collate_rows,
    loss_weights,
    pack_samples,
)

M = IGNORE_INDEX


def test_row_layout_by_hand():
    a = Sample([10, 11, 12, 13], [M, M, 12, 13], num_tiles=1, payload="a")
    b = Sample([20, 21, 22], [M, 21, 22], num_tiles=0, payload="b")
    (row,) = pack_samples([a, b], PackingConfig(seq_length=10, loss_reduction="token"))
    assert row.input_ids.tolist() == [10, 11, 12, 13, 20, 21, 22, 0, 0, 0]
    # Shifted inside each sample: position t is trained to predict labels[t]; the last token
    # of `a` does not predict the first token of `b`.
    assert row.labels.tolist() == [M, 12, 13, M, 21, 22, M, M, M, M]
    assert row.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert row.cu_seqlens.tolist() == [0, 4, 7, 10]
    assert row.loss_weights.tolist() == [0, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    assert row.tile_counts == [1, 0] and row.payloads == ["a", "b"] and row.num_tokens == 7


def test_full_row_has_no_padding_segment():
    samples = [Sample([1] * 6, [M] + [1] * 5), Sample([2] * 4, [M] + [2] * 3)]
    (row,) = pack_samples(samples, PackingConfig(seq_length=10))
    assert row.cu_seqlens.tolist() == [0, 6, 10] and row.num_tokens == 10


@pytest.mark.parametrize(
    ("reduction", "expected"), [("token", 1.0), ("sample", 1 / 4), ("square", 4**-0.5)]
)
def test_loss_weights_per_reduction(reduction, expected):
    shifted = np.array([M, 5, 6, M, 7, 8, M])  # 4 supervised tokens
    weights = loss_weights(shifted, reduction)
    assert weights.dtype == np.float32
    assert weights.tolist() == pytest.approx([0, expected, expected, 0, expected, expected, 0])
    assert loss_weights(np.array([M, M]), reduction).tolist() == [0, 0]


def test_weighted_loss_is_the_intended_average():
    """sum(w * CE) / sum(w) must be the token mean, the mean of per-sample means, or the
    sqrt-weighted mix, computed here straight from per-sample CE lists."""
    rng = np.random.default_rng(0)
    lengths, supervised = [9, 5, 14], [3, 1, 8]
    samples = []
    for n, x in zip(lengths, supervised, strict=True):
        labels = [M] * (n - x) + [7] * x
        samples.append(Sample([1] * n, labels))
    for reduction in ("token", "sample", "square"):
        (row,) = pack_samples(samples, PackingConfig(seq_length=32, loss_reduction=reduction))
        ce = rng.uniform(0.1, 5.0, 32)
        got = float((row.loss_weights * ce).sum() / row.loss_weights.sum())
        per_sample = []  # CE of each sample's supervised (shifted) positions
        for start, end in zip(row.cu_seqlens[:-2], row.cu_seqlens[1:-1], strict=True):
            mask = row.labels[start:end] != M
            per_sample.append(ce[start:end][mask])
        assert [len(c) for c in per_sample] == supervised
        if reduction == "token":
            want = np.concatenate(per_sample).mean()
        elif reduction == "sample":
            want = np.mean([c.mean() for c in per_sample])
        else:
            want = sum(c.sum() / np.sqrt(len(c)) for c in per_sample) / sum(
                np.sqrt(len(c)) for c in per_sample
            )
        assert got == pytest.approx(want, rel=1e-5)


def random_samples(count, seed, median=600, sigma=0.8, image_fraction=0.0, max_len=None):
    rng = np.random.default_rng(seed)
    samples = []
    for k in range(count):
        tiles = 0
        if rng.random() < image_fraction:
            tiles = int(rng.choice([1, 3, 5, 7, 9, 10, 13]))
            length = 256 * tiles + int(rng.lognormal(np.log(150), 0.8)) + 20
        else:
            length = max(16, int(rng.lognormal(np.log(median), sigma)))
        if max_len is not None:
            length = min(length, max_len)
        ids = (np.arange(length) + 1000 * k).tolist()  # unique per sample, to trace it
        labels = [M] * (length // 2) + ids[length // 2 :]
        samples.append(Sample(ids, labels, num_tiles=tiles, payload=k))
    return samples


@pytest.mark.parametrize("open_rows", [1, 4, 16])
def test_every_sample_lands_once_intact_within_caps(open_rows):
    cfg = PackingConfig(seq_length=2048, max_tiles_per_row=12, open_rows=open_rows)
    samples = random_samples(300, seed=open_rows, image_fraction=0.5, max_len=2048)
    rows = list(pack_samples(samples, cfg))
    seen = []
    for row in rows:
        assert row.num_tiles <= cfg.max_tiles_per_row and row.num_tokens <= cfg.seq_length
        bounds = row.cu_seqlens.tolist()
        assert bounds[0] == 0 and bounds[-1] == cfg.seq_length
        for index, k in enumerate(row.payloads):
            start, end = bounds[index], bounds[index + 1]
            original = samples[k]
            assert row.input_ids[start:end].tolist() == list(original.input_ids)
            assert row.labels[start:end].tolist() == [*original.labels[1:], M]
            assert row.position_ids[start:end].tolist() == list(range(end - start))
            assert row.tile_counts[index] == original.num_tiles
            seen.append(k)
        pad = slice(row.num_tokens, None)
        assert (row.labels[pad] == M).all() and (row.loss_weights[pad] == 0).all()
    kept = [k for k, s in enumerate(samples) if s.num_tiles <= cfg.max_tiles_per_row]
    assert sorted(seen) == kept  # the 13-tile samples exceed the cap of 12 and are dropped


def test_tile_cap_drops_and_counts_samples_that_can_never_fit():
    packer = SequencePacker(PackingConfig(seq_length=64, max_tiles_per_row=4))
    assert packer.add(Sample([1] * 8, [1] * 8, num_tiles=5)) == []
    assert packer.stats.dropped_too_many_tiles == 1 and packer.stats.samples_packed == 0


def test_overlong_samples_are_dropped_by_default():
    packer = SequencePacker(PackingConfig(seq_length=8))
    assert packer.add(Sample(list(range(9)), list(range(9)))) == []
    assert packer.stats.dropped_overlong == 1 and packer.flush() == []


def test_truncation_keeps_whole_images_or_drops_the_sample():
    img, ctx, end = 90, 91, 92
    cfg = PackingConfig(seq_length=8, overlong="truncate", image_context_id=ctx)
    packer = SequencePacker(cfg)
    # Image tokens end at index 3 (</img> at 4): the cut at 8 keeps them.
    ok = Sample([1, img, ctx, ctx, end, 5, 6, 7, 8, 9], [M] * 5 + [5, 6, 7, 8, 9], num_tiles=1)
    # The cut would split the <IMG_CONTEXT> run: dropped.
    split = Sample([1, 2, 3, 4, img, ctx, ctx, ctx, end, 9], [M] * 9 + [9], num_tiles=1)
    assert packer.add(split) == []
    (row,) = packer.add(ok)
    assert row.input_ids.tolist() == [1, img, ctx, ctx, end, 5, 6, 7]
    assert row.labels.tolist() == [M, M, M, M, 5, 6, 7, M]
    assert packer.stats.truncated == 1 and packer.stats.dropped_overlong == 1
    with pytest.raises(ValueError, match="needs image_context_id"):
        PackingConfig(overlong="truncate")


def test_micro_batch_stacks_rows_and_offsets_cu_seqlens():
    samples = [Sample([1] * n, [M] + [1] * (n - 1), num_tiles=t) for n, t in [(5, 2), (6, 1)]]
    cfg = PackingConfig(seq_length=8, open_rows=1)
    rows = list(pack_samples(samples, cfg))
    assert len(rows) == 2
    batch = collate_rows(rows)
    assert batch["tokens"].shape == batch["labels"].shape == (2, 8)
    assert batch["loss_weights"].dtype == torch.float32
    # The 6-token sample opens a second row; with one open row allowed, the fuller row is
    # emitted first. Row 0: sample [0,6) + pad [6,8); row 1: sample [8,13) + pad [13,16).
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2]]
    assert batch["cu_seqlens"].tolist() == [0, 6, 8, 13, 16]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert int(batch["max_seqlen"]) == 6
    assert batch["tile_counts"].tolist() == [1, 2]
    assert (batch["loss_weights"][batch["labels"] == M] == 0).all()


@pytest.mark.parametrize(
    ("seq_length", "image_fraction"), [(4096, 0.0), (16384, 0.0), (16384, 0.7)]
)
def test_fill_rate_on_a_realistic_length_mix(seq_length, image_fraction):
    # Lengths: lognormal, median 600 tokens, sigma 0.8; with images, 70% of samples carry
    # 1-13 tiles (256 tokens each) plus a shorter text, and rows hold at most 48 tiles.
    samples = random_samples(4000, seed=seq_length, image_fraction=image_fraction)
    packer = SequencePacker(PackingConfig(seq_length=seq_length, max_tiles_per_row=48))
    rows = [r for s in samples for r in packer.add(s)] + packer.flush()
    stats = packer.stats
    fill = sum(r.num_tokens for r in rows) / (len(rows) * seq_length)
    assert fill == pytest.approx(stats.fill_rate)
    print(
        f"\npacking fill: {100 * fill:.2f}% over {len(rows)} rows of {seq_length} "
        f"(image fraction {image_fraction}, dropped overlong {stats.dropped_overlong})"
    )
    assert fill >= 0.97


def test_samples_padded_for_context_parallelism_by_hand():
    """pad_to_multiple=4 (CP2): each sample occupies a multiple of 4 tokens; the padding follows
    its sample, weighs nothing, and `cu_seqlens` keep the real lengths (THD convention)."""
    a = Sample([10, 11, 12, 13, 14], [M, M, 12, 13, 14], payload="a")
    b = Sample([20, 21, 22], [M, 21, 22], payload="b")
    cfg = PackingConfig(seq_length=12, loss_reduction="token", pad_to_multiple=4)
    packer = SequencePacker(cfg)
    assert packer.add(a) == []
    (row,) = packer.add(b)  # 8 + 4 padded tokens fill the row
    assert row.input_ids.tolist() == [10, 11, 12, 13, 14, 0, 0, 0, 20, 21, 22, 0]
    assert row.labels.tolist() == [M, 12, 13, 14, M, M, M, M, 21, 22, M, M]
    assert row.loss_weights.tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0]
    assert row.cu_seqlens.tolist() == [0, 5, 8]
    assert row.cu_seqlens_padded.tolist() == [0, 8, 12]
    # Fill rate counts only real tokens: 8 of 12 (layout padding is waste).
    assert packer.stats.layout_padding == 4 and packer.stats.fill_rate == pytest.approx(8 / 12)
    batch = collate_rows([row, row])
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 13, 16]
    assert batch["cu_seqlens_padded"].tolist() == [0, 8, 12, 20, 24]


def test_seq_length_must_hold_whole_padded_samples():
    with pytest.raises(ValueError, match="multiple of pad_to_multiple=4"):
        PackingConfig(seq_length=10, pad_to_multiple=4)


def test_closing_a_row_finds_it_by_identity_with_numpy_token_arrays():
    # Samples as a tokenizer hands them over (numpy arrays). Rows A and B hold two samples each
    # (A is full of tiles, so `c` goes to B and fills it); closing B must not compare A's arrays
    # with B's (a value-compared row raised "truth value of an array is ambiguous").
    packer = SequencePacker(PackingConfig(seq_length=10, max_tiles_per_row=2))
    a = Sample(np.arange(6), np.arange(6), num_tiles=2, payload="a")
    b = Sample(np.arange(6), np.arange(6), num_tiles=0, payload="b")
    a2 = Sample(np.arange(2), np.arange(2), num_tiles=0, payload="a2")
    c = Sample(np.arange(4), np.arange(4), num_tiles=1, payload="c")
    assert packer.add(a) == [] and packer.add(b) == [] and packer.add(a2) == []
    (row,) = packer.add(c)
    assert row.payloads == ["b", "c"] and row.input_ids.tolist() == [*range(6), *range(4)]
    (rest,) = packer.flush()
    assert rest.payloads == ["a", "a2"]
