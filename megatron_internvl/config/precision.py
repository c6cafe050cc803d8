"""Numeric precision of a run: parameter dtype and the FP8 recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

FP8_RECIPES = ("delayed", "tensorwise", "mxfp8")


@dataclass(frozen=True)
class PrecisionConfig:
    """bf16 (or fp32) parameters, optionally FP8 GEMMs through Transformer Engine."""

    dtype: str = "float32"
    """Parameter and activation dtype: "float32" (CPU tests) or "bfloat16" (GPU training)."""
    fp8_recipe: str | None = None
    """None (off), "delayed" (amax history), "tensorwise" (current scaling, Hopper) or "mxfp8"
    (block scaling, Blackwell only)."""
    fp8_format: str = "hybrid"
    """"hybrid" (E4M3 forward, E5M2 gradients) or "e4m3"."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"precision.dtype={self.dtype!r}: use 'float32' or 'bfloat16'")
        if self.fp8_recipe is not None and self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(
                f"precision.fp8_recipe={self.fp8_recipe!r}: use one of {FP8_RECIPES} or None"
            )
        if self.fp8_format not in ("hybrid", "e4m3"):
            raise ValueError(f"precision.fp8_format={self.fp8_format!r}: use 'hybrid' or 'e4m3'")
        if self.fp8_recipe and self.dtype != "bfloat16":
            raise ValueError("FP8 trains bf16 master activations: set precision.dtype=bfloat16")

    def transformer_overrides(self) -> dict[str, Any]:
        """TransformerConfig fields for this precision."""
        dtype = torch.bfloat16 if self.dtype == "bfloat16" else torch.float32
        overrides: dict[str, Any] = {
            "params_dtype": dtype,
            "pipeline_dtype": dtype,
            "bf16": dtype is torch.bfloat16,
        }
        if self.fp8_recipe:
            overrides.update(fp8=self.fp8_format, fp8_recipe=self.fp8_recipe)
        return overrides
