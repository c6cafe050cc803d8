"""The load-balanced context-parallel split: which global tokens each rank holds."""

from __future__ import annotations

import pytest
import torch

from megatron_internvl.parallel.context_parallel import load_balanced_indices, split_for_rank


def test_rank_holds_chunk_r_and_its_mirror():
    # 16 tokens, cp=2 -> 4 chunks of 4: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert load_balanced_indices([0, 16], 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert load_balanced_indices([0, 16], 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_ranks_partition_every_packed_row(cp):
    cu_seqlens = [0, 8 * cp, 8 * cp + 16 * cp, 8 * cp + 24 * cp]
    held = torch.cat([load_balanced_indices(cu_seqlens, cp, r) for r in range(cp)])
    assert sorted(held.tolist()) == list(range(cu_seqlens[-1]))
    sizes = {len(load_balanced_indices(cu_seqlens, cp, r)) for r in range(cp)}
    assert sizes == {cu_seqlens[-1] // cp}  # balanced


def test_packed_split_stays_inside_each_sample():
    ranks = [load_balanced_indices([0, 4, 12], 2, r).tolist() for r in range(2)]
    assert ranks == [[0, 3, 4, 5, 10, 11], [1, 2, 6, 7, 8, 9]]


def test_split_for_rank_selects_along_the_sequence_dim():
    tokens = torch.arange(8).expand(3, 8)
    assert split_for_rank(tokens, 1, 2, 1).tolist() == [[2, 3, 4, 5]] * 3


def test_indivisible_sequence_says_what_to_do():
    with pytest.raises(ValueError, match=r"divisible by 4.*10 tokens at offset 8.*pad"):
        load_balanced_indices([0, 8, 18], 2, 0)
