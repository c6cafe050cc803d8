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

from tests.harness import RankError, run_on_ranks
from tests.train_runs import (
    INIT,
    STEPS,
    Run,
    base_overrides,
    build_demo_split,
    curves,
    run_all,
    scalars,
)

TOLERANCE = 5e-5

SP = ("parallel.tensor=2", "parallel.sequence_parallel=true")
STAGE1 = ("train.stage=1",)
ONE_RANK = [
    INIT,
    Run("init_pad1", (*INIT.overrides, "data.pad_to_multiple=1")),
    Run("init_pad8", (*INIT.overrides, "data.pad_to_multiple=8")),
    Run("one_rank"),
    Run("one_rank_dealt2", dealt_over=2),
    Run("one_rank_every_step", ("train.valid_interval=1",)),
    Run("one_rank_stage1", STAGE1),
    Run("micro_batch2", ("train.micro_batch=2",)),
]
LAYOUTS = {
    "dp2": (
        2,
        [Run("dp2"), Run("dp2_nan_skipped", ("train.nonfinite=skip",), nan_grad_at=2)],
        "one_rank_dealt2",
    ),
    "tp2_sp": (
        2,
        [
            Run("tp2_sp", (*SP, "checkpoint.save_every=2")),
            Run("tp2_sp_resumed", SP, resume_from=("tp2_sp", 2)),
            Run("tp2_sp_stage1", (*SP, *STAGE1)),
        ],
        "one_rank",
    ),
    "pp2_uneven": (
        2,
        [Run("pp2_uneven", ("parallel.pipeline=2", "parallel.first_stage_layers=1"))],
        "one_rank",
    ),
    "cp2": (2, [Run("cp2", ("parallel.context=2",))], "one_rank"),
    "cp2_tp2_sp": (4, [Run("cp2_tp2_sp", ("parallel.context=2", *SP))], "one_rank"),
    "pp2_tp2": (4, [Run("pp2_tp2", ("parallel.pipeline=2", "parallel.tensor=2"))], "one_rank"),
}
REFERENCE = {"tp2_sp_stage1": "one_rank_stage1"}
SKIPPED = {"dp2_nan_skipped": 2}
RESUMED_FROM = {"tp2_sp_resumed": 2}


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
    for run in runs:
        reference = curves(out, REFERENCE.get(run.name, reference_name))
        got = curves(out, run.name)
        first = RESUMED_FROM.get(run.name, 0) + 1
        assert sorted(got.losses) == list(range(first, STEPS + 1)), run.name
        if run.name in SKIPPED:
            _check_skipped(out, run.name, SKIPPED[run.name], reference)
            continue
        expected = {k: v for k, v in reference.losses.items() if k >= first}
        assert _close(got.losses, expected) < TOLERANCE, (run.name, got, reference)
        assert _close(got.valid, reference.valid) < TOLERANCE, (run.name, got, reference)


def _check_skipped(out, name: str, step: int, reference) -> None:
    """A NaN gradient on one rank at `step`: every rank skipped that update (the scheduler did
    not move, the skip is counted) and training went on."""
    got = curves(out, name)
    assert abs(got.losses[1] - reference.losses[1]) < TOLERANCE
    skipped = scalars(out, name, "train/skipped_steps")
    assert skipped == {k: float(k >= step) for k in range(1, STEPS + 1)}
    lr = scalars(out, name, "train/lr")
    assert lr[step] == lr[step - 1] and lr[step + 1] < lr[step]


def test_a_nan_gradient_on_one_rank_stops_every_rank_when_asked(matrix):
    _, base = matrix
    stop = Run("dp2_nan_stop", ("train.nonfinite=stop",), nan_grad_at=2)
    with pytest.raises(RankError) as failure:
        run_on_ranks(run_all, 2, base, [stop], timeout_s=600)
    assert str(failure.value).count("NonFiniteError: step 2: non-finite") == 2


def test_micro_batches_of_two_rows_equal_twice_the_single_row_micro_batches(matrix):
    out, _ = matrix
    one, two = curves(out, "one_rank"), curves(out, "micro_batch2")
    assert _close(two.losses, one.losses) < TOLERANCE and _close(two.valid, one.valid) < TOLERANCE


def test_layout_padding_is_masked_from_loss_and_attention(matrix):
    """The held-out loss of the initial weights (lr 0) packed with samples padded to 1, 4 and 8
    tokens: different rows, the same loss."""
    out, _ = matrix
    losses = [curves(out, name).valid[2] for name in ("init_pad1", INIT.name, "init_pad8")]
    assert max(losses) - min(losses) < 1e-5, losses


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
