"""Synthetic rows: a pure function of (seed, rank, index), text that follows one permutation (so
it is learnable), drawn from a chosen text vocabulary when asked."""

from __future__ import annotations

import pytest
import torch

from megatron_internvl.data.synthetic import SyntheticRows, SyntheticSpec

SPEC = SyntheticSpec(
    vocab_size=300, image_token_id=291, tokens_per_tile=16, image_size=28, seq_length=96
)


def _text(row: dict) -> torch.Tensor:
    tokens = row["tokens"][0]
    return tokens[tokens != SPEC.image_token_id]


def test_rows_are_a_function_of_their_index():
    first = SyntheticRows(SPEC, seed=5, dp_rank=0, dp_size=1).next_microbatches(3)
    later = SyntheticRows(SPEC, seed=5, dp_rank=0, dp_size=1)
    later.next_index = 2
    assert torch.equal(later.next_microbatches(1)[0]["tokens"], first[2]["tokens"])


@pytest.mark.parametrize("text_vocab", [None, 16])
def test_text_follows_one_permutation_of_the_chosen_vocabulary(text_vocab):
    import dataclasses

    spec = dataclasses.replace(SPEC, text_vocab=text_vocab)
    source = SyntheticRows(spec, seed=5, dp_rank=0, dp_size=1)
    rows = source.next_microbatches(4)
    limit = text_vocab or SPEC.image_token_id
    successor: dict[int, int] = {}
    for row in rows:
        text = _text(row)
        assert int(text.max()) < limit
        tokens, labels, mask = row["tokens"][0], row["labels"][0], row["loss_mask"][0]
        for t, nxt in zip(tokens[mask > 0].tolist(), labels[mask > 0].tolist(), strict=True):
            assert successor.setdefault(t, nxt) == nxt  # one successor per token: learnable
    assert len(torch.cat([_text(r) for r in rows]).unique()) <= limit


def test_a_text_vocabulary_beyond_the_text_ids_is_refused():
    import dataclasses

    with pytest.raises(ValueError, match="synthetic_text_vocab=400: give 2 to 291"):
        SyntheticRows(dataclasses.replace(SPEC, text_vocab=400), seed=0, dp_rank=0, dp_size=1)
