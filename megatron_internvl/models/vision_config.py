"""Shape of an InternViT vision encoder, as plain data (no torch, no Megatron)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

VisionNorm = Literal["LayerNorm", "RMSNorm"]
_NORMS = ("LayerNorm", "RMSNorm")


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """An InternViT: patch conv + class token + learned positions, pre-norm layers with
    per-channel layer scale, GELU MLP, bidirectional attention and no final norm.
    """

    num_layers: int
    """Encoder layers (the released 6B has 45: the last 3 of 48 were dropped)."""
    hidden_size: int
    """Model width C."""
    num_attention_heads: int
    """Attention heads (25 for 6B, which TP 2/4/8 does not divide)."""
    ffn_hidden_size: int
    """GELU MLP intermediate width."""
    head_dim: int
    """Per-head width; InternViT always has num_attention_heads * head_dim == hidden_size."""
    norm: VisionNorm
    """Pre-norm type of norm1/norm2: "LayerNorm" (weight and bias) or "RMSNorm" (weight only)."""
    norm_eps: float = 1e-6
    """Epsilon of norm1/norm2 and of the QK norms."""
    qkv_bias: bool
    """Bias on the fused [Q; K; V] projection."""
    qk_norm: bool
    """RMSNorm on q and k over the full width (all heads together, not per head)."""
    image_size: int = 448
    """Tile side in pixels the position embedding was trained for."""
    patch_size: int = 14
    """Patch conv kernel and stride."""
    drop_path_rate: float = 0.0
    """Stochastic-depth rate of the last layer (linspace from 0); recipes set 0.1 / 0.4."""
    layer_scale_init: float = 0.1
    """Initial value of the ls1/ls2 layer-scale vectors."""

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
            if getattr(self, field) <= 0:
                raise ValueError(
                    f"VisionConfig.{field} must be positive, got {getattr(self, field)}"
                )
        if self.norm not in _NORMS:
            raise ValueError(f"VisionConfig.norm must be one of {_NORMS}, got {self.norm!r}")
        # InternViT derives head_dim as C // heads and raises when it does not divide; so does
        # transformers. Keeping head_dim explicit only documents it (6B: 25 x 128 = 3200).
        if self.num_attention_heads * self.head_dim != self.hidden_size:
            raise ValueError(
                f"VisionConfig: num_attention_heads * head_dim = {self.num_attention_heads} * "
                f"{self.head_dim} must equal hidden_size = {self.hidden_size}; set head_dim to "
                f"hidden_size / num_attention_heads"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VisionConfig: image_size {self.image_size} must be a multiple of patch_size "
                f"{self.patch_size}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(
                f"VisionConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate}"
            )

    @property
    def grid_size(self) -> int:
        """Patches per tile side (32 for 448 / 14)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches per tile, without the class token (1024 for 448 / 14)."""
        return self.grid_size**2


INTERNVIT_300M = VisionConfig(
    num_layers=24,
    hidden_size=1024,
    num_attention_heads=16,
    ffn_hidden_size=4096,
    head_dim=64,
    norm="LayerNorm",
    qkv_bias=True,
    qk_norm=False,
)
"""InternViT-300M-448px-V2_5 (1B, 2B, 4B, 8B)."""

INTERNVIT_6B = VisionConfig(
    num_layers=45,
    hidden_size=3200,
    num_attention_heads=25,
    ffn_hidden_size=12800,
    head_dim=128,
    norm="RMSNorm",
    qkv_bias=False,
    qk_norm=True,
)
"""InternViT-6B-448px-V2_5 (26B, 38B, 78B)."""
