"""Model families derived from a registry flavour by scaling its depth and width.

Width keeps the head size: heads (and key/value groups where they divide), hidden and FFN sizes
scale together, so a scaled model is the same architecture, just wider. Depth scales the layer
count. A derived shape reaches training as a JSON file (`model.spec_file`), not as a registry
entry.
"""

from __future__ import annotations

import dataclasses

from megatron_internvl.models.registry import InternVLSpec
from megatron_internvl.sweeps.config import SweepError


def _scaled(count: int, factor: float, what: str, axis: str) -> int:
    """count x factor, which must be a positive whole number (e.g. 'LLM layers', 'depth')."""
    value = count * factor
    if abs(value - round(value)) > 1e-9 or round(value) < 1:
        raise SweepError(
            f"{what} {count} x {axis} {factor:g} = {value:g} is not a positive whole number; "
            f"use a {axis} multiple of 1/{count}"
        )
    return round(value)


def scale_spec(
    spec: InternVLSpec, vit_depth: float, vit_width: float, llm_depth: float, llm_width: float
) -> InternVLSpec:
    """`spec` with each tower's layers x depth and heads/hidden/FFN x width."""
    vit, lang = spec.vision, spec.language
    vit_heads = _scaled(vit.num_attention_heads, vit_width, "ViT heads", "width")
    vision = dataclasses.replace(
        vit,
        num_layers=_scaled(vit.num_layers, vit_depth, "ViT layers", "depth"),
        num_attention_heads=vit_heads,
        hidden_size=vit_heads * vit.head_dim,
        ffn_hidden_size=max(1, round(vit.ffn_hidden_size * vit_width)),
    )
    heads = _scaled(lang.num_attention_heads, llm_width, "LLM heads", "width")
    head_dim = lang.kv_channels or lang.hidden_size // lang.num_attention_heads
    groups = lang.num_query_groups * llm_width
    if abs(groups - round(groups)) > 1e-9 or round(groups) < 1 or heads % round(groups):
        groups = lang.num_query_groups if heads % lang.num_query_groups == 0 else 1
    language = dataclasses.replace(
        lang,
        num_layers=_scaled(lang.num_layers, llm_depth, "LLM layers", "depth"),
        num_attention_heads=heads,
        num_query_groups=round(groups),
        hidden_size=heads * head_dim,
        kv_channels=lang.kv_channels,
        ffn_hidden_size=max(1, round(lang.ffn_hidden_size * llm_width)),
    )
    name = (
        f"{spec.name}_sweep_vit{vision.num_layers}x{vision.hidden_size}"
        f"_llm{language.num_layers}x{language.hidden_size}"
    )
    return dataclasses.replace(spec, name=name, vision=vision, language=language)
