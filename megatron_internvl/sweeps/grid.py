"""Grid expansion: every model size x every token count x every learning rate."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from megatron_internvl.sweeps.config import SweepConfig


@dataclass(frozen=True)
class Scale:
    """One model of the family: multipliers of the base recipe's ViT and LLM."""

    vit_depth: float
    vit_width: float
    llm_depth: float
    llm_width: float


def model_scales(cfg: SweepConfig) -> list[Scale]:
    """The family's members: the product of the four multiplier lists."""
    vit, llm = cfg.models.vit, cfg.models.llm
    return [
        Scale(*values) for values in itertools.product(vit.depth, vit.width, llm.depth, llm.width)
    ]


def steps_for_tokens(tokens: float, tokens_per_step: int) -> int:
    """Whole optimizer steps closest to `tokens` (at least one)."""
    return max(1, round(tokens / tokens_per_step))


def grid_runs(cfg: SweepConfig, recipe_lr: float) -> list[tuple[float, float]]:
    """(tokens, lr) of every grid point of one model, in declaration order."""
    return list(itertools.product(cfg.tokens, cfg.lr or [recipe_lr]))
