"""The training loop's shard source with the prefetch thread: the same micro-batches as
without it, and a state that resumes exactly (prefetched but unconsumed rows are neither lost
nor repeated)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from megatron_internvl.data.loader import DatasetSpec, InternVLLoader, LoaderConfig, shard_list
from megatron_internvl.data.tiler import TilerConfig
from megatron_internvl.training.build_data import ShardSource
from tests.train_runs import build_demo_split

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def make_source(tmp_path_factory):
    split = build_demo_split(tmp_path_factory.mktemp("shards"))
    shards = shard_list(split["train"])
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "demo" / "tokenizer")
    cfg = LoaderConfig(
        seq_length=128,
        max_tiles_per_row=12,
        tokens_per_tile=16,
        read_ahead=4,
        tiler=TilerConfig(image_size=56, max_num=4),
    )

    def make(prefetch: int) -> ShardSource:
        loader = InternVLLoader([DatasetSpec("train", shards)], tokenizer, cfg)
        return ShardSource(loader, prefetch)

    return make


def _keys(batches) -> list[list[str]]:
    return [batch["sample_keys"] for batch in batches]


def test_prefetched_stream_resumes_exactly(make_source):
    straight = make_source(0)
    expected = _keys(straight.next_microbatches(8))
    straight.close()

    first = make_source(2)
    head = _keys(first.next_microbatches(3))
    state = first.state_dict()
    rest = _keys(first.next_microbatches(5))
    first.close()
    assert head + rest == expected  # the thread changes nothing in the stream

    resumed = make_source(2)
    resumed.load_state_dict(state)  # the prefetcher had run ahead of these 3 micro-batches
    assert _keys(resumed.next_microbatches(5)) == rest
    resumed.close()
