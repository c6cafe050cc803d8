"""An independent oracle: transformers' native InternVL built from a registry spec.

transformers' `InternVLForConditionalGeneration` is written and maintained apart from this
project, so parameter counts (and later, numerics) taken from it check our model and specs
rather than restating them. It needs the optional `transformers` dependency (the `dev` extra).

Layout differences against the original InternViT, all accounted for here:
- q/k/v are three Linears instead of one fused `qkv`: the same number of parameters.
- `InternVLVisionModel` ends in a LayerNorm unless `use_mean_pooling=True`; InternViT has no
  final norm, so the config sets `use_mean_pooling=True` (the default, which the transformers
  conversion script relies on) and `hf_parameter_counts` checks no such norm was built.
- InternLM2 becomes Llama (split wqkv, `embed_tokens`, `lm_head`): the same parameter set.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import transformers

from megatron_internvl.models.registry import InternVLSpec

_NORM_TYPE = {"LayerNorm": "layer_norm", "RMSNorm": "rms_norm"}

# Parameter-name prefixes of InternVLForConditionalGeneration, by component.
_GROUPS = {
    "vision": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "language": ("model.language_model.", "lm_head."),
}


def _text_config(spec: InternVLSpec) -> transformers.PreTrainedConfig:
    lang = spec.language
    head_dim = lang.kv_channels or lang.hidden_size // lang.num_attention_heads
    rope: dict[str, object] = {"rope_type": "default", "rope_theta": lang.rope_theta}
    if spec.rope_dynamic_factor is not None:
        rope = {
            "rope_type": "dynamic",
            "factor": spec.rope_dynamic_factor,
            "rope_theta": lang.rope_theta,
        }
    common = dict(
        vocab_size=lang.vocab_size,
        hidden_size=lang.hidden_size,
        intermediate_size=lang.ffn_hidden_size,
        num_hidden_layers=lang.num_layers,
        num_attention_heads=lang.num_attention_heads,
        num_key_value_heads=lang.num_query_groups,
        head_dim=head_dim,
        hidden_act="silu",
        rms_norm_eps=lang.norm_eps,
        rope_parameters=rope,
        # Both families were trained to 32k; dynamic NTK scales RoPE only past this length.
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    )
    if spec.llm_family == "qwen2":
        # Qwen2Attention hard-codes bias on q/k/v (none on o_proj); it has no attention_bias knob.
        return transformers.Qwen2Config(**common)
    # Llama's attention_bias covers q/k/v *and* o_proj, matching InternLM2's single `bias` flag.
    return transformers.LlamaConfig(**common, attention_bias=lang.qkv_bias, mlp_bias=False)


def hf_internvl_config(spec: InternVLSpec) -> transformers.InternVLConfig:
    """transformers' native InternVLConfig for `spec` (text config: Qwen2 or Llama)."""
    vit = spec.vision
    vision_config = transformers.InternVLVisionConfig(
        hidden_size=vit.hidden_size,
        num_hidden_layers=vit.num_layers,
        num_attention_heads=vit.num_attention_heads,
        intermediate_size=vit.ffn_hidden_size,
        hidden_act="gelu",
        attention_bias=vit.qkv_bias,
        use_qk_norm=vit.qk_norm,
        norm_type=_NORM_TYPE[vit.norm],
        layer_norm_eps=vit.norm_eps,
        image_size=vit.image_size,
        patch_size=vit.patch_size,
        layer_scale_init_value=vit.layer_scale_init,
        use_mask_token=False,
        use_absolute_position_embeddings=True,
        use_mean_pooling=True,  # True means "no final LayerNorm", as in InternViT
    )
    return transformers.InternVLConfig(
        vision_config=vision_config,
        text_config=_text_config(spec),
        image_token_id=spec.image_token_id,
        image_seq_length=spec.tokens_per_tile,
        downsample_ratio=spec.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def build_hf_model(spec: InternVLSpec) -> transformers.InternVLForConditionalGeneration:
    """The transformers model for `spec` on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return transformers.InternVLForConditionalGeneration(hf_internvl_config(spec))


def group_parameter_counts(named_shapes: Iterable[tuple[str, torch.Size]]) -> dict[str, int]:
    """Sum parameter counts by component; fails on a name outside the known prefixes."""
    counts = dict.fromkeys(_GROUPS, 0)
    for name, shape in named_shapes:
        group = next((g for g, pre in _GROUPS.items() if name.startswith(pre)), None)
        if group is None:
            raise ValueError(f"parameter {name!r} belongs to no known component")
        counts[group] += shape.numel()
    counts["total"] = sum(counts[g] for g in _GROUPS)
    return counts


def hf_parameter_counts(spec: InternVLSpec) -> dict[str, int]:
    """{"vision", "projector", "language", "total"} parameter counts of transformers' model."""
    model = build_hf_model(spec)
    # Guard the InternViT correspondence: no final norm, no mask token.
    lacking = ("model.vision_tower.layernorm.", "model.vision_tower.embeddings.mask_token")
    extra = [n for n, _ in model.named_parameters() if n.startswith(lacking)]
    if extra:
        raise AssertionError(f"transformers built parameters InternViT lacks: {extra}")
    return group_parameter_counts((n, p.shape) for n, p in model.named_parameters())
