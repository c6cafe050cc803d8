"""`parallel.vision_tensor`: the ViT at a smaller tensor parallelism than the LLM's, its
replicas splitting the tiles, gives one rank's loss, gradients and grad norm.

Tolerances (float32, tiny flavours): loss within 1e-6, every gradient within 1e-6 absolute
(reference gradients reach ~0.15), grad norm within 1e-5 relative, parameters after one Adam
step within 1e-6. The micro-batches hold 3, 1 and 0 tiles: uneven shares (zero-tile padding)
and a text-only row.
"""

from __future__ import annotations

import pytest
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_internvl.config.schema import load_run_config
from megatron_internvl.config.validate import RecipeError, validate
from megatron_internvl.models.registry import get_spec
from megatron_internvl.models.vision import vision_transformer_config
from megatron_internvl.models.vision_config import INTERNVIT_6B
from megatron_internvl.parallel.layout import ParallelLayout
from megatron_internvl.train import compose
from tests import vision_tensor_cases
from tests.harness import run_on_ranks
from tests.train_runs import INIT, STEPS, Run, base_overrides, build_demo_split, curves, run_all

GRAD_TOLERANCE = 1e-6


def _assert_matches(report: dict) -> None:
    assert report["reference_grad_scale"] > 1e-2
    for name, result in report.items():
        if not isinstance(result, dict):
            continue
        assert result["loss"] == pytest.approx(report["reference_loss"], abs=1e-6), name
        worst = max(result["diffs"], key=result["diffs"].get)
        assert result["grad_diff"] < GRAD_TOLERANCE, f"{name}: {worst} off by {result['grad_diff']}"


def _assert_optimizer_step_matches(result: dict) -> None:
    assert result["loss"] == pytest.approx(result["reference_loss"], abs=1e-6)
    assert result["reference_grad_norm"] > 0.1  # clipping ran: the norm scales every update
    assert result["grad_norm"] == pytest.approx(result["reference_grad_norm"], rel=1e-5)
    assert result["update_size"] > 1e-3
    assert result["param_diff"] < 1e-6


def test_vision_tensor_must_divide_tensor():
    with pytest.raises(ValueError, match=r"vision_tensor=3 must divide tensor=4; use one of"):
        ParallelLayout(tensor=4, vision_tensor=3)
    layout = ParallelLayout(tensor=4, vision_tensor=2)
    assert (layout.vision_tensor_size, layout.vision_replicas) == (2, 2)
    assert str(layout) == "tp4-pp1-cp1-vtp2"
    assert str(ParallelLayout(tensor=4, vision_tensor=4)) == "tp4-pp1-cp1"  # today's layout


def test_recipe_fields_reach_the_layout_and_are_checked_at_the_boundary():
    def load(*overrides: str):
        return load_run_config(compose(["recipe=demo_cpu_shards", *overrides]))

    cfg = load("parallel.tensor=2", "parallel.vision_tensor=1", "model.recompute=full+vit")
    spec = get_spec(cfg.model.flavour)
    layout = validate(cfg, spec, 2)
    assert (layout.tensor, layout.vision_tensor_size, cfg.model.recompute) == (2, 1, "full+vit")
    with pytest.raises(RecipeError, match=r"vision_tensor=3 must divide tensor=2"):
        validate(
            load("parallel.tensor=2", "parallel.vision_tensor=3"), get_spec(cfg.model.flavour), 2
        )
    with pytest.raises(RecipeError, match=r"model.recompute='vit'; use null, 'selective'"):
        validate(load("model.recompute=vit"), spec, 2)


@pytest.mark.parametrize(
    ("tensor", "vision_tensor", "heads"), [(8, None, 32), (8, 1, 25), (10, 5, 25), (8, 4, 28)]
)
def test_head_padding_follows_the_vision_tensor_parallelism(tensor, vision_tensor, heads):
    layout = ParallelLayout(tensor=tensor, vision_tensor=vision_tensor)
    config: TransformerConfig = vision_transformer_config(INTERNVIT_6B, layout)
    assert config.num_attention_heads == heads
    assert config.tensor_model_parallel_size == layout.vision_tensor_size


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vision_tensor")
    return run_on_ranks(vision_tensor_cases.two_rank_reports, 2, str(tmp), timeout_s=600)[0]


def test_tp2_with_vision_tp1_matches_one_rank_with_and_without_sp(two_ranks):
    _assert_matches(two_ranks["one_rank"])


def test_checkpoints_reshard_between_vision_tp2_and_vision_tp1(two_ranks):
    # Reference at TP=2 (vision TP 2): its weights load at vision TP 1, whose gradients are
    # saved and loaded back at vision TP 2.
    _assert_matches(two_ranks["resharded"])


def test_vit_recomputation_gives_the_same_gradients(two_ranks):
    _assert_matches(two_ranks["recomputed"])


def test_grad_norm_counts_each_vit_shard_once(two_ranks):
    _assert_optimizer_step_matches(two_ranks["optimizer"])


def test_four_rank_layouts_with_vision_tp1_match_one_rank(tmp_path):
    report = run_on_ranks(vision_tensor_cases.four_rank_reports, 4, str(tmp_path), timeout_s=900)[0]
    _assert_matches(report["one_rank"])
    _assert_optimizer_step_matches(report["optimizer"])
    _assert_matches(report["vision_sp"])  # TP=4 + SP, vision TP=2: SP inside each replica


SP = ("parallel.tensor=2", "parallel.sequence_parallel=true")
VISION_TP1 = ("parallel.vision_tensor=1",)
STAGE_1_5 = ("train.stage=1.5",)  # ViT + projector train, the LLM is frozen
TRAIN_TOLERANCE = 5e-5  # per-step losses ~7 after Adam steps: see tests/test_train_layouts.py


def test_training_entry_on_demo_shards_gives_the_vision_tp2_losses(tmp_path):
    """train() on the demo shards at TP=2 + SP: vision TP 1 gives vision TP 2's per-step and
    validation losses (stage 2 and stage 1.5), and resumes from a vision TP 2 checkpoint."""
    out = tmp_path / "runs"
    base = base_overrides(build_demo_split(tmp_path / "shards"), out)
    run_on_ranks(run_all, 1, base, [INIT], timeout_s=600)
    runs = [
        Run("vtp2", (*SP, "checkpoint.save_every=2")),
        Run("vtp1", (*SP, *VISION_TP1)),
        Run("vtp1_resumed", (*SP, *VISION_TP1), resume_from=("vtp2", 2)),
        Run("vtp2_stage1_5", (*SP, *STAGE_1_5)),
        Run("vtp1_stage1_5", (*SP, *VISION_TP1, *STAGE_1_5)),
    ]
    run_on_ranks(run_all, 2, base, runs, timeout_s=900)
    for name, reference in [("vtp1", "vtp2"), ("vtp1_stage1_5", "vtp2_stage1_5")]:
        got, expected = curves(out, name), curves(out, reference)
        assert sorted(got.losses) == list(range(1, STEPS + 1)), name
        assert max(abs(got.losses[k] - expected.losses[k]) for k in got.losses) < TRAIN_TOLERANCE
        assert abs(got.valid[STEPS] - expected.valid[STEPS]) < TRAIN_TOLERANCE, name
    assert curves(out, "vtp1_stage1_5").losses != curves(out, "vtp1").losses  # stages differ
    resumed, expected = curves(out, "vtp1_resumed"), curves(out, "vtp2")
    assert sorted(resumed.losses) == [STEPS]
    assert abs(resumed.losses[STEPS] - expected.losses[STEPS]) < TRAIN_TOLERANCE
    # The runs did shard the ViT as asked: the projector's fc1 is saved in vision-TP pieces.
    assert _saved_pieces(out, "vtp2", PROJECTOR_FC1) == 2
    assert _saved_pieces(out, "vtp1", PROJECTOR_FC1) == 1


PROJECTOR_FC1 = "vision_projection.mlp.linear_fc1.weight"


def _saved_pieces(out, name: str, key: str) -> int:
    """Shards of `key` in the run's last checkpoint, by torch's own checkpoint reader."""
    from torch.distributed.checkpoint import FileSystemReader

    last = sorted((out / name / "checkpoints").glob("step_*"))[-1]
    return len(FileSystemReader(str(last)).read_metadata().state_dict_metadata[key].chunks)
