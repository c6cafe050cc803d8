"""Model FLOPs of an InternVL training step (the MFU numerator), one formula for logging and sweeps.

Counted: every matrix multiply, 2 FLOPs per multiply-add; a trained part costs 3 x its forward
(backward = activation gradients + weight gradients, each about one forward); a frozen LLM that
gradients must cross (stage 1) costs 2x; a frozen ViT only its forward. Recomputation is NOT
counted: these are model FLOPs, not hardware FLOPs.
Norms, activations, softmax and RoPE are ignored (they are not matmuls).

- ViT, per tile of T = (image_size/patch)^2 + 1 tokens with real heads (padding excluded):
  patch conv 2*T_p*(3*p^2)*C, per layer 2*T*(4*C*C_attn... ) written out in `vit_forward_flops`,
  attention 4*T^2*C_attn per layer (QK^T and AV, bidirectional, full T^2).
- Projector, per tile: tokens_per_tile * 2 * (4C*H + H*H).
- LLM, per row: linear layers 2 * tokens * (QKV + proj + SwiGLU) per layer, output layer
  2 * tokens * H * V, attention 4 * C_attn * sum_i(len_i^2) per layer over the row's
  sub-samples (full len^2 as in Megatron-LM's count, even though causal attention needs half).
Tiles enter once per tile: a row's FLOPs grow with its tile count, not with its image tokens.

Scaling-law sweeps (megatron_internvl/sweeps/plan.py) count compute with this same formula:
C = steps x global_batch x the mean `training_flops` of rows drawn from the run's data loader,
so each row's tiles and sub-sample lengths enter as they do in the MFU logged during training.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_internvl.models.registry import InternVLSpec


def vit_forward_flops(spec: InternVLSpec, tiles: int) -> float:
    vit = spec.vision
    c, f = vit.hidden_size, vit.ffn_hidden_size
    attn_width = vit.num_attention_heads * vit.head_dim
    patches = vit.num_patches
    tokens = patches + 1
    patch_embed = 2 * patches * 3 * vit.patch_size**2 * c
    linears = 2 * tokens * (3 * c * attn_width + attn_width * c + 2 * c * f)
    attention = 4 * tokens**2 * attn_width
    return tiles * (patch_embed + vit.num_layers * (linears + attention))


def projector_forward_flops(spec: InternVLSpec, tiles: int) -> float:
    h = spec.language.hidden_size
    return tiles * spec.tokens_per_tile * 2 * (spec.projector_input_size * h + h * h)


def llm_forward_flops(spec: InternVLSpec, sample_lengths: Sequence[int]) -> float:
    lang = spec.language
    h = lang.hidden_size
    head_dim = lang.kv_channels or h // lang.num_attention_heads
    q_width = lang.num_attention_heads * head_dim
    kv_width = lang.num_query_groups * head_dim
    tokens = sum(sample_lengths)
    per_token = 2 * (h * (q_width + 2 * kv_width) + q_width * h + 3 * h * lang.ffn_hidden_size)
    attention = 4 * q_width * sum(n * n for n in sample_lengths)
    output = 2 * tokens * h * lang.vocab_size  # the real vocabulary: padding is not model work
    return lang.num_layers * (tokens * per_token + attention) + output


# Stage -> (ViT, projector, LLM) cost multipliers of the forward.
_STAGE_FACTORS = {"1": (1, 3, 2), "1.5": (3, 3, 2), "2": (3, 3, 3)}


def training_flops(
    spec: InternVLSpec, sample_lengths: Sequence[int], tiles: int, stage: str = "2"
) -> float:
    """Model FLOPs of forward + backward over rows with these sub-sample lengths and tiles."""
    vit, projector, llm = _STAGE_FACTORS[stage]
    return (
        vit * vit_forward_flops(spec, tiles)
        + projector * projector_forward_flops(spec, tiles)
        + llm * llm_forward_flops(spec, sample_lengths)
    )
