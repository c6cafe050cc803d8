"""A sample's training cost for data-parallel balancing, from the FLOPs model (data/ never
imports models or training, so the coefficients are made here)."""

from __future__ import annotations

from megatron_internvl.data.balance import CostModel
from megatron_internvl.models.registry import InternVLSpec
from megatron_internvl.training.flops import (
    _STAGE_FACTORS,
    llm_forward_flops,
    projector_forward_flops,
    vit_forward_flops,
)


def sample_cost_model(spec: InternVLSpec, stage: str = "2") -> CostModel:
    """Coefficients of training/flops.py's formula, which is linear in tiles and, per sample,
    quadratic in length (so two lengths determine it), for the stage's trained/frozen parts."""
    vit, projector, llm = _STAGE_FACTORS[stage]
    one, two = llm_forward_flops(spec, [1]), llm_forward_flops(spec, [2])
    squared = (two - 2 * one) / 2
    return CostModel(
        per_tile=vit * vit_forward_flops(spec, 1) + projector * projector_forward_flops(spec, 1),
        per_token=llm * (one - squared),
        per_token_squared=llm * squared,
    )
