"""The real-data layout matrix: `train()` (what `python -m megatron_internvl.train` runs) on the
bundled demo shards (real images, tokenizer, packing) gives the one-rank run's per-step losses
and validation loss at every layout.

Tolerance (float32): per-step losses within 5e-5 absolute (losses ~7; reduction order differs
between layouts, and Adam's first steps move every weight by ~lr whatever the gradient's size,
so differences of a few ulp in a gradient can show after a step), validation loss within 5e-5.
"""

from __future__ import annotations

import json

import pytest

from tests.harness import run_on_ranks
from tests.train_runs import INIT, STEPS, Run, base_overrides, build_demo_split, curves, run_all

TOLERANCE = 5e-5

ONE_RANK = [
    INIT,
    Run("one_rank"),
    Run("one_rank_dealt2", dealt_over=2),
    Run("one_rank_every_step", ("train.valid_interval=1",)),
]
LAYOUTS = {
    "dp2": (2, [Run("dp2")], "one_rank_dealt2"),
    "tp2_sp": (
        2,
        [Run("tp2_sp", ("parallel.tensor=2", "parallel.sequence_parallel=true"))],
        "one_rank",
    ),
    "pp2_uneven": (
        2,
        [Run("pp2_uneven", ("parallel.pipeline=2", "parallel.first_stage_layers=1"))],
        "one_rank",
    ),
}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    split = build_demo_split(root / "shards")
    out = root / "runs"
    base = base_overrides(split, out)
    run_on_ranks(run_all, 1, base, ONE_RANK, timeout_s=600)
    return out, base


def _close(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) for k in a)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_one_rank(matrix, layout):
    out, base = matrix
    world, runs, reference_name = LAYOUTS[layout]
    run_on_ranks(run_all, world, base, runs, timeout_s=600)
    reference = curves(out, reference_name)
    for run in runs:
        got = curves(out, run.name)
        assert sorted(got.losses) == list(range(1, STEPS + 1))
        assert _close(got.losses, reference.losses) < TOLERANCE, (got, reference)
        assert _close(got.valid, reference.valid) < TOLERANCE, (got, reference)


def test_validation_loss_is_logged_and_saved_and_leaves_training_alone(matrix):
    out, _ = matrix
    last = curves(out, "one_rank")
    every = curves(out, "one_rank_every_step")
    # Only after the last step by default; after every step with valid_interval=1.
    assert list(last.valid) == [STEPS] and list(every.valid) == [1, 2, 3]
    # Evaluating (eval mode, no gradients, its own data stream) changes nothing in training.
    assert every.losses == last.losses and every.valid[STEPS] == last.valid[STEPS]
    assert len(set(every.valid.values())) == 3  # the model changed between evaluations
    meta = json.loads(next((out / "one_rank" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["valid_loss"] == pytest.approx(last.valid[STEPS], rel=1e-6)
