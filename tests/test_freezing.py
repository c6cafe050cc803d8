"""Stage freezing: only the stage's parts move, and only they hold optimizer state (PP=2)."""

from __future__ import annotations

import pytest

from megatron_internvl.parallel.layout import ParallelLayout
from megatron_internvl.training.freezing import freeze_for_stage
from tests import internvl_cases
from tests.harness import run_on_ranks

EXPECTED_MOVING = {
    "1": ["vision_projection"],
    "1.5": ["vision_model", "vision_projection"],
    "2": ["language_model", "vision_model", "vision_projection"],
}


def _stages(tmp: str) -> dict:
    return {
        stage: internvl_cases.frozen_stage_step(
            tmp, "tiny_qwen_300m_style", stage, ParallelLayout(pipeline=2)
        )
        for stage in EXPECTED_MOVING
    }


def test_each_stage_trains_only_its_parts(tmp_path):
    first, last = run_on_ranks(_stages, 2, str(tmp_path))
    for stage, moving in EXPECTED_MOVING.items():
        # Stage 0 holds ViT + projector + LLM layers; stage 1 only LLM layers.
        assert first[stage]["moved"] == moving, stage
        assert last[stage]["moved"] == (["language_model"] if stage == "2" else []), stage
        for rank in (first, last):
            result = rank[stage]
            assert result["optimizer_state_numel"] == result["counts"]["trainable"], stage
        assert first[stage]["loss"] == pytest.approx(last[stage]["loss"])


def test_unknown_stage_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown training stage '3'.*\['1', '1.5', '2'\]"):
        freeze_for_stage([], "3")
