"""The balanced loader (data.balance) on the demo shards: the tile and token counts it reads
before decoding are what decoding and tokenizing produce; every rank computes the same deal of
the stream-order global batch; it resumes exactly; data.balance=false is the strided loader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from megatron_internvl.data.balance import StepDeal
from megatron_internvl.data.balanced import BalancedLoader
from megatron_internvl.data.demo_data import build_demo_shards, demo_tokenizer
from megatron_internvl.data.loader import DatasetSpec, InternVLLoader, LoaderConfig
from megatron_internvl.data.samples import SampleConfig
from megatron_internvl.data.tiler import TilerConfig
from megatron_internvl.data.video import video_member
from megatron_internvl.models.registry import get_spec
from megatron_internvl.training.sample_cost import sample_cost_model
from tests.test_data_loader import assert_same_batches, take

COST = sample_cost_model(get_spec("internvl2_5_8b"))
ROWS = 2  # rows per rank per step (micro-batches of one row)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[str, ...]:
    summary = build_demo_shards(tmp_path_factory.mktemp("demo"), max_samples=8)
    return tuple(str(p) for p in summary.shards)


@pytest.fixture(scope="module")
def tokenizer():
    return demo_tokenizer()


def config(**overrides) -> LoaderConfig:
    """The demo recipe's data settings at 56 px tiles (fast DALI on two cores)."""
    base = {
        "seq_length": 512,
        "max_tiles_per_row": 12,
        "max_tiles_per_sample": 12,
        "tokens_per_tile": 16,
        "seed": 5,
        "tiler": TilerConfig(image_size=56, max_num=4, jpeg_quality=(75, 100)),
        "sample": SampleConfig(video_frames=(4, 8)),
    }
    return LoaderConfig(**{**base, **overrides})


def loaders(demo, tokenizer, cfg=None, ranks=2):
    specs = [DatasetSpec("demo", demo)]
    return [
        BalancedLoader(specs, tokenizer, cfg or config(), r, ranks, COST, ROWS)
        for r in range(ranks)
    ]


def test_counts_read_before_decoding_are_the_decoded_ones(demo, tokenizer):
    loader = loaders(demo, tokenizer, ranks=1)[0]
    plain = InternVLLoader([DatasetSpec("demo", demo)], tokenizer, config())
    refs = [(0, 0, i) for i in range(len(plain.entries[0]))]
    kinds = set()
    for ref, sample in zip(refs, plain._materialize(refs), strict=True):
        tiles, tokens = loader.meta[0][ref[2]]
        decoded = (sample.num_tiles, len(sample.input_ids))
        if video_member(plain.entries[0][ref[2]].members):  # counted at the most frames
            kinds.add("video")
            assert tiles == 8 >= decoded[0] and tokens >= decoded[1]
        else:
            kinds.add(f"{sample.num_tiles > 0} {len(sample.payload.tiles)}")
            assert (tiles, tokens) == decoded, sample.payload.name
    assert {"video", "False 0", "True 1", "True 2"} <= kinds  # text, one and two images


def test_side_files_are_reused_and_a_damaged_one_is_rebuilt(demo, tokenizer):
    loaders(demo, tokenizer, ranks=1)
    side = sorted(Path(demo[0]).parent.glob("*.meta-*.json"))
    assert len(side) == len(demo)
    stamps = [os.stat(p).st_mtime_ns for p in side]
    good = side[0].read_text()
    side[0].write_text('{"version": 1, "samples": [[1, 2]]}')  # wrong count: stale
    again = loaders(demo, tokenizer, ranks=1)[0]
    assert [os.stat(p).st_mtime_ns for p in side[1:]] == stamps[1:]  # reused as they were
    assert json.loads(side[0].read_text()) == json.loads(good)
    other = loaders(demo, tokenizer, config(tiler=TilerConfig(image_size=56, max_num=2)), 1)[0]
    assert len(list(Path(demo[0]).parent.glob("*.meta-*.json"))) == 2 * len(demo)
    assert other.meta != again.meta  # another tile cap: other counts, in their own files


def rows_of_steps(pair, steps):
    """Per step: each rank's rows (as sample references) and the deal's figures."""
    out = []
    for _ in range(steps):
        step = [[r for _ in range(ROWS) for r in loader.next_rows()] for loader in pair]
        assert pair[0].dealer.figures == pair[1].dealer.figures
        assert pair[0].dealer.carry == pair[1].dealer.carry
        out.append([[[p.ref for p in row.payloads] for row in rank] for rank in step])
        for row in (row for rank in step for row in rank):
            assert row.num_tokens <= 512 and row.num_tiles <= 12
    return out


def test_ranks_deal_the_stream_orders_global_batch_by_cost(demo, tokenizer, monkeypatch):
    steps = 5  # past the end of the first epoch (31 samples)
    dealt = rows_of_steps(loaders(demo, tokenizer), steps)
    monkeypatch.setattr(StepDeal, "balanced", False)  # the stream-order deal
    stream = rows_of_steps(loaders(demo, tokenizer), steps)
    moved = 0
    for ours, theirs in zip(dealt, stream, strict=True):
        refs = [ref for rank in ours for row in rank for ref in row]
        assert len(refs) == len(set(refs))  # no sample on two ranks or twice
        assert sorted(refs) == sorted(ref for rank in theirs for row in rank for ref in row)
        moved += ours[0] != theirs[0]
    assert moved  # the deal differs from the stream order's (else nothing was tested)


@pytest.mark.parametrize("stop", [2, 3])  # at a step's end, and in the middle of one
def test_resumed_rank_yields_the_uninterrupted_stream(demo, tokenizer, stop):
    total = 8
    uninterrupted = take(loaders(demo, tokenizer)[1], total)
    first = loaders(demo, tokenizer)[1]
    head = take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = loaders(demo, tokenizer)[1]
    resumed.load_state_dict(state)
    assert_same_batches(head + take(resumed, total - stop), uninterrupted)
    strided = InternVLLoader([DatasetSpec("demo", demo)], tokenizer, config(), 1, 2)
    with pytest.raises(ValueError, match=r"saved without data\.balance"):
        resumed.load_state_dict(strided.state_dict())
    with pytest.raises(ValueError, match=r"saved with data\.balance=true"):
        strided.load_state_dict(state)


def test_balance_off_builds_the_strided_loader(demo):
    from megatron_internvl.config.schema import load_run_config
    from megatron_internvl.train import compose
    from megatron_internvl.training.build_data import (
        data_source,
        fit_spec_to_tokenizer,
        load_tokenizer,
        loader_config,
    )
    from megatron_internvl.training.build_model import resolved_spec

    def source(balance: bool):
        shards = f"data.shards=[{Path(demo[0]).parent}]"
        cfg = load_run_config(compose(["recipe=demo_cpu_shards", shards, f"data.balance={balance}",
                                       "data.prefetch=0", "train.global_batch=4"]))  # fmt: skip
        tokenizer = load_tokenizer(cfg)
        spec = fit_spec_to_tokenizer(resolved_spec(cfg), tokenizer)
        return data_source(cfg, spec, 1, 2, tokenizer), cfg, spec, tokenizer

    off, cfg, spec, tokenizer = source(False)
    assert type(off.loader) is InternVLLoader
    plain = InternVLLoader(off.loader.datasets, tokenizer, loader_config(cfg, spec), 1, 2)
    assert_same_batches(off.next_microbatches(3), take(plain, 3))
    on = source(True)[0]
    assert type(on.loader) is BalancedLoader and on.loader.rows_per_rank == 2
    assert on.next_microbatches(1)[0]["balance"]["max_over_mean"] >= 1.0


def test_side_files_built_ahead_by_the_tool_are_the_ones_training_reads(tmp_path):
    """tools/balance_meta.py in two parts builds every shard's side file once; a balanced
    training run through the training entry then reads them (same fingerprint: none rebuilt)."""
    import subprocess
    import sys

    from megatron_internvl.data.demo_data import DEMO_DIR

    shards = tmp_path / "shards"
    build_demo_shards(shards, max_samples=4)
    tars = sorted(shards.glob("*.tar"))
    assert len(tars) >= 3
    root = Path(__file__).resolve().parents[1]
    run = ["recipe=demo_cpu_shards", f"data.shards=[{shards}]", "data.balance=true"]
    run += [f"data.tokenizer={DEMO_DIR / 'tokenizer'}", f"output_dir={tmp_path / 'runs'}"]

    def tool(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(root / "tools" / "balance_meta.py"), *args],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )  # fmt: skip

    parts = [tool(*run, "--part", f"{k}/2") for k in range(2)]
    for part in parts:
        assert part.returncode == 0, part.stderr[-2000:]
    assert sum(p.stdout.count("data: measuring ") for p in parts) == len(tars)  # built once
    lines = [line for p in parts for line in p.stdout.splitlines() if "] " in line]
    assert sorted(line.split("] ")[1].split(":")[0] for line in lines) == [str(t) for t in tars]
    side = {p: p.stat().st_mtime_ns for p in shards.glob("*.meta-*.json")}
    assert len(side) == len(tars)  # one per shard, one fingerprint
    bad = tool(*run, "--part", "2/2")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --part '2/2'"), bad.stderr
    train = subprocess.run(
        [sys.executable, "-m", "megatron_internvl.launch.local", "--standalone",
         "--nproc-per-node", "1", "-m", "megatron_internvl.train", *run, "parallel.tensor=1",
         "parallel.sequence_parallel=false", "train.steps=1", "train.warmup_steps=0"],
        capture_output=True, text=True, timeout=600, cwd=root,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    # The same files, untouched: training's fingerprint is the tool's (else it adds its own).
    assert {p: p.stat().st_mtime_ns for p in shards.glob("*.meta-*.json")} == side
    assert "data: measuring" not in train.stdout + train.stderr
