"""The held-out stream: one pass over the demo shards, every sample once over data-parallel
ranks, read from the start at each evaluation, `valid_batches` global batches when asked."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from megatron_internvl.data.loader import DatasetSpec, InternVLLoader, LoaderConfig, shard_list
from megatron_internvl.data.samples import SampleConfig
from megatron_internvl.data.shard_index import read_index
from megatron_internvl.data.tiler import TilerConfig
from megatron_internvl.training.validation import ValidationSet
from tests.train_runs import build_demo_split

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    split = build_demo_split(tmp_path_factory.mktemp("shards"))
    shards = shard_list(split["valid"])
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "demo" / "tokenizer")

    def loader(dp_rank=0, dp_size=1, micro_batch=1):
        cfg = LoaderConfig(
            seq_length=384,  # the demo clip's sample (up to 8 frames) fits
            micro_batch_size=micro_batch,
            max_tiles_per_row=12,
            tokens_per_tile=16,
            shuffle=False,
            epochs=1,
            sample=SampleConfig(video_frames=(4, 8)),  # the demo clip fits the tile cap, as in
            tiler=TilerConfig(image_size=56, max_num=4),  # the demo recipe
        )
        return InternVLLoader([DatasetSpec("valid", shards)], tokenizer, cfg, dp_rank, dp_size)

    keys = [e.name for shard in shards for e in read_index(shard)]
    return loader, keys


def _keys(batches) -> list[str]:
    return [k for batch in batches for k in batch["sample_keys"]]


def test_one_pass_reads_every_sample_once_at_any_data_parallel_size(held_out):
    loader, keys = held_out
    assert sorted(_keys(loader())) == sorted(keys)
    halves = [_keys(loader(rank, 2)) for rank in range(2)]
    assert sorted(halves[0] + halves[1]) == sorted(keys)
    assert not set(halves[0]) & set(halves[1])


def test_the_last_micro_batch_is_filled_with_rows_that_weigh_nothing(held_out):
    loader, keys = held_out
    batches = list(loader(micro_batch=2))
    rows = [row for batch in batches for row in batch["loss_mask"]]
    single = list(loader())
    assert len(single) % 2 == 1, "the demo set should end on a half-full micro-batch"
    assert len(rows) == len(single) + 1 and float(rows[-1].sum()) == 0.0
    assert sorted(_keys(batches)) == sorted(keys)


def test_each_evaluation_starts_over_and_valid_batches_limits_it(held_out):
    loader, _ = held_out
    whole = ValidationSet(loader(), microbatches_per_step=2, max_steps=None)
    first = [_keys(group) for group in whole.microbatch_groups()]
    second = [_keys(group) for group in whole.microbatch_groups()]
    assert first == second and sum(map(len, first)) > 0
    one = ValidationSet(loader(), microbatches_per_step=2, max_steps=1)
    groups = list(one.microbatch_groups())
    assert len(groups) == 1 and len(groups[0]) == 2
    assert _keys(groups[0]) == first[0]
