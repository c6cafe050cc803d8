"""`train()` with data.balance=true on the demo shards at DP2: the global batch of each step is
the one the unbalanced (stream-order) deal gives, with the same token-weighted loss; the
balance figures reach the console and TensorBoard; a resumed run deals every later step to the
same ranks exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import run_on_ranks
from tests.train_runs import _copy_checkpoint, build_demo_split, scalars

STEPS = 4


def overrides(split: dict[str, list[str]], out: Path) -> list[str]:
    return [
        "recipe=demo_cpu_shards",
        f"output_dir={out}",
        "checkpoint.pretrained=null",
        "parallel.tensor=1",
        "parallel.sequence_parallel=false",
        "parallel.gpus=null",
        f"train.steps={STEPS}",
        "train.warmup_steps=1",
        "train.global_batch=4",  # 2 rows per rank: the deal balances ranks and rows
        "logging.log_every=2",
        "checkpoint.save_every=2",
        "data.balance=true",
        f"data.shards=[{','.join(split['train'])}]",
    ]


def train_runs(base: list[str]) -> dict[str, list[list[str]]]:
    """On every rank: train 'balanced', 'stream' (the stream-order deal), then 'resumed' from
    balanced's step-2 checkpoint; returns the sample keys this rank trained on, per step."""
    import torch.distributed as dist

    from megatron_internvl.config.schema import load_run_config
    from megatron_internvl.data.balance import StepDeal
    from megatron_internvl.train import compose
    from megatron_internvl.training import loop

    keys: dict[str, list[list[str]]] = {}
    original = loop.data_source

    def recording(name):
        def source(*args, **kwargs):
            data = original(*args, **kwargs)
            take = data.next_microbatches

            def next_microbatches(count):
                batches = take(count)
                keys[name].append(sorted(k for b in batches for k in b["sample_keys"]))
                return batches

            data.next_microbatches = next_microbatches
            return data

        return source

    for name in ("balanced", "stream", "resumed"):
        cfg = load_run_config(compose([*base, f"name={name}"]))
        if name == "resumed" and dist.get_rank() == 0:
            _copy_checkpoint(Path(cfg.output_dir), ("balanced", 2), name)
        dist.barrier()
        keys[name] = []
        loop.data_source = recording(name)
        StepDeal.balanced = name != "stream"
        try:
            assert loop.train(cfg) == 0
        finally:
            loop.data_source, StepDeal.balanced = original, True
    return keys


def test_balanced_training_keeps_the_global_batch_logs_and_resumes_exactly(tmp_path, capfd):
    split = build_demo_split(tmp_path / "shards")
    out = tmp_path / "runs"
    ranks = run_on_ranks(train_runs, 2, overrides(split, out), timeout_s=900)
    console = capfd.readouterr().out
    for rank in ranks:
        assert len(rank["balanced"]) == len(rank["stream"]) == STEPS
        assert rank["resumed"] == rank["balanced"][2:]  # the same samples on this rank
    per_step = [[ranks[0][run][s] + ranks[1][run][s] for s in range(STEPS)]
                for run in ("balanced", "stream")]  # fmt: skip
    for balanced_keys, stream_keys in zip(*per_step, strict=True):
        assert sorted(balanced_keys) == sorted(stream_keys)  # the same global batch
    # The deal moved samples between ranks at least once (else the test compares nothing).
    assert any(ranks[0]["balanced"][s] != ranks[0]["stream"][s] for s in range(STEPS))

    losses = {run: scalars(out, run, "train/loss") for run in ("balanced", "stream", "resumed")}
    assert set(losses["balanced"]) == {1, 2, 4}
    for step, loss in losses["balanced"].items():  # fp32 sums in another order: rel 1e-5
        assert loss == pytest.approx(losses["stream"][step], rel=1e-5, abs=0)
    assert losses["resumed"][4] == losses["balanced"][4]  # bit for bit

    for tag in ("max_over_mean", "stream_max_over_mean"):
        ratio = scalars(out, "balanced", f"data/balance_{tag}")
        assert set(ratio) == {1, 2, 4} and all(1.0 <= r < 2.0 for r in ratio.values())
    # Logged steps: 1, 2, 4 of 'balanced' and 'stream', 4 of 'resumed'.
    assert console.count("| rank cost max/mean 1.") == 7, console[-3000:]
