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

# Parameter-name prefixes of InternVLForConditionalGeneration, by component.
_GROUPS = {
    "vision": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "language": ("model.language_model.", "lm_head."),
}


def hf_internvl_config(spec: InternVLSpec) -> transformers.InternVLConfig:
    """transformers' native InternVLConfig for `spec`: the export's own config (one mapping of
    spec fields to transformers' names, not a second copy here); it is pinned to transformers'
    documented defaults and the published InternVL 2.5 configs in
    tests/test_convert_tables.py::test_native_config_is_the_published_one."""
    from megatron_internvl.checkpoint.hf_config import native_config

    return native_config(spec, "float32")


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
