"""InternVL 2.5 flavours as plain data: ViT shape + LLM shape + the glue between them.

Numbers come from /work/shared/reference/internvl25.md (sections 1 and 2); the parameter counts
they imply are checked against transformers' InternVLForConditionalGeneration and the model
cards in tests/test_registry.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_internvl.models.language import LanguageConfig
from megatron_internvl.models.vision_config import INTERNVIT_6B, INTERNVIT_300M, VisionConfig

LLMFamily = Literal["qwen2", "internlm2"]

# QKV bias is a property of the family, and transformers' Qwen2 hard-codes it, so a spec that
# disagrees could not be reproduced by the oracle (or loaded from a real checkpoint).
_FAMILY_QKV_BIAS: dict[str, bool] = {"qwen2": True, "internlm2": False}

QWEN_IMAGE_TOKEN_ID = 151667
"""`<IMG_CONTEXT>` in Qwen2.5 tokenizers extended by InternVL."""
INTERNLM2_IMAGE_TOKEN_ID = 92546
"""`<IMG_CONTEXT>` in InternLM2.5 tokenizers extended by InternVL."""


@dataclass(frozen=True, kw_only=True)
class InternVLSpec:
    """One InternVL flavour: InternViT -> pixel shuffle -> MLP projector -> LLM."""

    name: str
    """Registry key, e.g. "internvl2_5_8b"."""
    vision: VisionConfig
    """The InternViT."""
    language: LanguageConfig
    """The LLM (vocab already resized for the 9 tokens InternVL adds)."""
    llm_family: LLMFamily
    """Checkpoint layout of the LLM: "qwen2" or "internlm2" (Llama in transformers' layout)."""
    downsample_ratio: float = 0.5
    """Pixel-shuffle ratio per side; 0.5 folds 2x2 patches into one token of 4 * C channels."""
    image_token_id: int
    """Id of `<IMG_CONTEXT>`, whose embeddings are replaced by projected image tokens."""
    rope_dynamic_factor: float | None = None
    """Dynamic-NTK RoPE factor of InternLM2.5 (None: plain RoPE); acts only past the trained
    context length, so training at <= 32k tokens never uses it."""

    def __post_init__(self) -> None:
        lang = self.language
        where = f"InternVLSpec {self.name!r}"
        if self.llm_family not in _FAMILY_QKV_BIAS:
            raise ValueError(
                f"{where}: llm_family must be one of {sorted(_FAMILY_QKV_BIAS)}, "
                f"got {self.llm_family!r}"
            )
        if lang.qkv_bias != _FAMILY_QKV_BIAS[self.llm_family]:
            raise ValueError(
                f"{where}: the {self.llm_family} family has qkv_bias="
                f"{_FAMILY_QKV_BIAS[self.llm_family]}; set language.qkv_bias accordingly "
                f"or change llm_family"
            )
        for field in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups"):
            if getattr(lang, field) <= 0:
                raise ValueError(f"{where}: language.{field} must be positive")
        if lang.num_attention_heads % lang.num_query_groups:
            raise ValueError(
                f"{where}: language.num_attention_heads ({lang.num_attention_heads}) must be a "
                f"multiple of language.num_query_groups ({lang.num_query_groups}); change either"
            )
        if lang.kv_channels is None and lang.hidden_size % lang.num_attention_heads:
            raise ValueError(
                f"{where}: language.hidden_size ({lang.hidden_size}) is not a multiple of "
                f"num_attention_heads ({lang.num_attention_heads}); set language.kv_channels"
            )
        factor = 1.0 / self.downsample_ratio
        if not (self.downsample_ratio > 0 and factor == round(factor)):
            raise ValueError(
                f"{where}: downsample_ratio must be 1/k for an integer k (0.5 in InternVL 2.5), "
                f"got {self.downsample_ratio}"
            )
        if self.vision.grid_size % round(factor):
            raise ValueError(
                f"{where}: the {self.vision.grid_size}x{self.vision.grid_size} patch grid is not "
                f"divisible by 1/downsample_ratio = {round(factor)}; change vision.image_size or "
                f"downsample_ratio"
            )
        if not 0 <= self.image_token_id < lang.vocab_size:
            raise ValueError(
                f"{where}: image_token_id {self.image_token_id} must be a row of the vocabulary "
                f"(0 <= id < language.vocab_size = {lang.vocab_size})"
            )
        if self.rope_dynamic_factor is not None and self.rope_dynamic_factor <= 1.0:
            raise ValueError(
                f"{where}: rope_dynamic_factor must be > 1 or None, got {self.rope_dynamic_factor}"
            )

    @property
    def pixel_shuffle_factor(self) -> int:
        """Patches folded per side into one token (2 for downsample 0.5)."""
        return round(1.0 / self.downsample_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens per image tile (256 for 448 px, patch 14, downsample 0.5)."""
        return (self.vision.grid_size // self.pixel_shuffle_factor) ** 2

    @property
    def projector_input_size(self) -> int:
        """Channels entering the projector: vision hidden x pixel_shuffle_factor^2."""
        return self.vision.hidden_size * self.pixel_shuffle_factor**2


def _qwen2(**shape: int) -> LanguageConfig:
    return LanguageConfig(**shape, qkv_bias=True, norm_eps=1e-6, rope_theta=1e6)


def _internlm2(rope_theta: float = 1e6, **shape: int) -> LanguageConfig:
    return LanguageConfig(**shape, qkv_bias=False, norm_eps=1e-5, rope_theta=rope_theta)


# Vocab sizes are len(tokenizer) after InternVL adds its 9 special tokens (not the LLM's padded
# config vocab): Qwen2.5 151665 + 9, InternLM2.5 92544 + 9.
_QWEN_VOCAB = 151674
_INTERNLM2_VOCAB = 92553

_SPECS = (
    InternVLSpec(
        name="internvl2_5_1b",
        vision=INTERNVIT_300M,
        language=_qwen2(
            num_layers=24,
            hidden_size=896,
            num_attention_heads=14,
            num_query_groups=2,
            ffn_hidden_size=4864,
            vocab_size=_QWEN_VOCAB,
        ),
        llm_family="qwen2",
        image_token_id=QWEN_IMAGE_TOKEN_ID,
    ),
    InternVLSpec(
        name="internvl2_5_2b",
        vision=INTERNVIT_300M,
        language=_internlm2(
            num_layers=24,
            hidden_size=2048,
            num_attention_heads=16,
            num_query_groups=8,
            ffn_hidden_size=8192,
            vocab_size=_INTERNLM2_VOCAB,
        ),
        llm_family="internlm2",
        image_token_id=INTERNLM2_IMAGE_TOKEN_ID,
        rope_dynamic_factor=2.0,
    ),
    InternVLSpec(
        name="internvl2_5_4b",
        vision=INTERNVIT_300M,
        language=_qwen2(
            num_layers=36,
            hidden_size=2048,
            num_attention_heads=16,
            num_query_groups=2,
            ffn_hidden_size=11008,
            vocab_size=_QWEN_VOCAB,
        ),
        llm_family="qwen2",
        image_token_id=QWEN_IMAGE_TOKEN_ID,
    ),
    InternVLSpec(
        name="internvl2_5_8b",
        vision=INTERNVIT_300M,
        language=_internlm2(
            num_layers=32,
            hidden_size=4096,
            num_attention_heads=32,
            num_query_groups=8,
            ffn_hidden_size=14336,
            vocab_size=_INTERNLM2_VOCAB,
        ),
        llm_family="internlm2",
        image_token_id=INTERNLM2_IMAGE_TOKEN_ID,
        rope_dynamic_factor=2.0,
    ),
    InternVLSpec(
        name="internvl2_5_26b",
        vision=INTERNVIT_6B,
        language=_internlm2(
            num_layers=48,
            hidden_size=6144,
            num_attention_heads=48,
            num_query_groups=8,
            ffn_hidden_size=16384,
            vocab_size=_INTERNLM2_VOCAB,
            rope_theta=5e7,  # (derived) see the reference table
        ),
        llm_family="internlm2",
        image_token_id=INTERNLM2_IMAGE_TOKEN_ID,
    ),
    InternVLSpec(
        name="internvl2_5_38b",
        vision=INTERNVIT_6B,
        language=_qwen2(
            num_layers=64,
            hidden_size=5120,
            num_attention_heads=40,
            num_query_groups=8,
            ffn_hidden_size=27648,
            vocab_size=_QWEN_VOCAB,
        ),
        llm_family="qwen2",
        image_token_id=QWEN_IMAGE_TOKEN_ID,
    ),
    InternVLSpec(
        name="internvl2_5_78b",
        vision=INTERNVIT_6B,
        language=_qwen2(
            num_layers=80,
            hidden_size=8192,
            num_attention_heads=64,
            num_query_groups=8,
            ffn_hidden_size=29568,
            vocab_size=_QWEN_VOCAB,
        ),
        llm_family="qwen2",
        image_token_id=QWEN_IMAGE_TOKEN_ID,
    ),
    # Tiny flavours for CPU tests: 56 px tiles are a 4x4 patch grid -> 4 tokens per tile.
    InternVLSpec(
        name="tiny_qwen_300m_style",
        vision=VisionConfig(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            ffn_hidden_size=128,
            head_dim=8,
            norm="LayerNorm",
            qkv_bias=True,
            qk_norm=False,
            image_size=56,
        ),
        language=_qwen2(
            num_layers=4,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=128,
            vocab_size=300,
        ),
        llm_family="qwen2",
        image_token_id=290,
    ),
    InternVLSpec(
        name="tiny_internlm_6b_style",
        # 5 heads like 6B's 25: not divisible by TP=2, so the QK-norm/head-padding paths run.
        vision=VisionConfig(
            num_layers=2,
            hidden_size=40,
            num_attention_heads=5,
            ffn_hidden_size=160,
            head_dim=8,
            norm="RMSNorm",
            qkv_bias=False,
            qk_norm=True,
            image_size=56,
        ),
        language=_internlm2(
            num_layers=4,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=128,
            vocab_size=300,
            rope_theta=5e7,
        ),
        llm_family="internlm2",
        image_token_id=290,
    ),
)

REGISTRY: dict[str, InternVLSpec] = {spec.name: spec for spec in _SPECS}
"""All flavours by name."""


def spec_to_dict(spec: InternVLSpec) -> dict:
    """A JSON-able record of `spec` (for checkpoints whose shape differs from the registry's)."""
    import dataclasses

    return dataclasses.asdict(spec)


def spec_from_dict(record: dict) -> InternVLSpec:
    """Inverse of `spec_to_dict`."""
    fields = dict(record)
    fields["vision"] = VisionConfig(**fields["vision"])
    fields["language"] = LanguageConfig(**fields["language"])
    return InternVLSpec(**fields)


def get_spec(name: str) -> InternVLSpec:
    """The flavour called `name`; KeyError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown InternVL flavour {name!r}; known flavours: {', '.join(REGISTRY)}"
        ) from None
