"""Declarative weight tables: Megatron parameter <-> HF tensor(s), one table per layout and family.

A row reads `R(megatron_name, hf_name(s), transform, when=feature)`:
- names are full parameter names; `{i}` is the layer index (ViT layers in vision tables, LLM
  layers in language tables);
- Megatron names are the TP=1 model's `state_dict()` names (the local spec; the dist
  checkpoint stores norms under TE names through `sharded_state_dict_keys_map`);
- `transform` names an entry of `hf_transforms.TRANSFORMS`;
- `when` names a feature of the flavour (`FEATURES`); the row exists only if the flavour has it.

Layouts:
- "original": OpenGVLab's `InternVLChatModel` (`vision_model.*`, `mlp1.{0,1,3}.*`,
  `language_model.*` as Qwen2 or InternLM2 remote code), what the released checkpoints use;
- "native": transformers' `InternVLForConditionalGeneration` state-dict names (InternLM2 becomes
  Llama). Its `save_pretrained` writes four prefixes in their older spelling
  (`NATIVE_FILE_PREFIXES`); the converter reads both spellings and writes the file spelling.
"""

# ruff: noqa: E501 (the tables keep one row per line, in aligned columns, for review)
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from megatron_internvl.models.registry import InternVLSpec


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter and the HF tensor(s) it is made of."""

    megatron: str
    hf: tuple[str, ...]
    transform: str = "identity"
    when: str | None = None
    layers: str | None = None
    """"vision" or "language" when the names hold `{i}` (set by the table)."""


def R(megatron: str, hf: str | tuple[str, ...], transform: str = "identity", when=None) -> Rule:  # noqa: N802
    return Rule(megatron, (hf,) if isinstance(hf, str) else hf, transform, when)


FEATURES = {
    "vit_norm_bias": "InternViT norms are LayerNorm (300M), which have a bias",
    "vit_qkv_bias": "InternViT qkv has a bias (300M)",
    "vit_qk_norm": "InternViT has the full-width QK-norm (6B)",
    "llm_qkv_bias": "the LLM's q/k/v projections have biases (Qwen2)",
}


def features_of(spec: InternVLSpec) -> set[str]:
    """The `when` features a flavour has."""
    present = {
        "vit_norm_bias": spec.vision.norm == "LayerNorm",
        "vit_qkv_bias": spec.vision.qkv_bias,
        "vit_qk_norm": spec.vision.qk_norm,
        "llm_qkv_bias": spec.language.qkv_bias,
    }
    return {name for name, on in present.items() if on}


# fmt: off
_V = "vision_model.embeddings."
_VL = "vision_model.encoder.layers.{i}."
_NV = "model.vision_tower."
_NVL = "model.vision_tower.encoder.layer.{i}."

VISION_ORIGINAL = (
    R(f"{_V}class_embedding",                           f"{_V}class_embedding"),
    R(f"{_V}position_embedding",                        f"{_V}position_embedding"),
    R(f"{_V}patch_embedding.weight",                    f"{_V}patch_embedding.weight"),
    R(f"{_V}patch_embedding.bias",                      f"{_V}patch_embedding.bias"),
    R(f"{_VL}input_layernorm.weight",                   f"{_VL}norm1.weight"),
    R(f"{_VL}input_layernorm.bias",                     f"{_VL}norm1.bias", when="vit_norm_bias"),
    R(f"{_VL}self_attention.linear_qkv.weight",         f"{_VL}attn.qkv.weight", "vit_qkv_fused"),
    R(f"{_VL}self_attention.linear_qkv.bias",           f"{_VL}attn.qkv.bias", "vit_qkv_fused",
      when="vit_qkv_bias"),
    R(f"{_VL}self_attention.q_layernorm.weight",        f"{_VL}attn.q_norm.weight", "vit_qk_norm",
      when="vit_qk_norm"),
    R(f"{_VL}self_attention.k_layernorm.weight",        f"{_VL}attn.k_norm.weight", "vit_qk_norm",
      when="vit_qk_norm"),
    R(f"{_VL}self_attention.linear_proj.weight",        f"{_VL}attn.proj.weight", "vit_proj_columns"),
    R(f"{_VL}self_attention.linear_proj.bias",          f"{_VL}attn.proj.bias"),
    R(f"{_VL}self_attn_bda.layer_scale",                f"{_VL}ls1"),
    R(f"{_VL}pre_mlp_layernorm.weight",                 f"{_VL}norm2.weight"),
    R(f"{_VL}pre_mlp_layernorm.bias",                   f"{_VL}norm2.bias", when="vit_norm_bias"),
    R(f"{_VL}mlp.linear_fc1.weight",                    f"{_VL}mlp.fc1.weight"),
    R(f"{_VL}mlp.linear_fc1.bias",                      f"{_VL}mlp.fc1.bias"),
    R(f"{_VL}mlp.linear_fc2.weight",                    f"{_VL}mlp.fc2.weight"),
    R(f"{_VL}mlp.linear_fc2.bias",                      f"{_VL}mlp.fc2.bias"),
    R(f"{_VL}mlp_bda.layer_scale",                      f"{_VL}ls2"),
)

VISION_NATIVE = (
    R(f"{_V}class_embedding",                           f"{_NV}embeddings.cls_token"),
    R(f"{_V}position_embedding",                        f"{_NV}embeddings.position_embeddings"),
    R(f"{_V}patch_embedding.weight",                    f"{_NV}embeddings.patch_embeddings.projection.weight"),
    R(f"{_V}patch_embedding.bias",                      f"{_NV}embeddings.patch_embeddings.projection.bias"),
    R(f"{_VL}input_layernorm.weight",                   f"{_NVL}layernorm_before.weight"),
    R(f"{_VL}input_layernorm.bias",                     f"{_NVL}layernorm_before.bias", when="vit_norm_bias"),
    R(f"{_VL}self_attention.linear_qkv.weight",         (f"{_NVL}attention.q_proj.weight",
                                                         f"{_NVL}attention.k_proj.weight",
                                                         f"{_NVL}attention.v_proj.weight"), "vit_qkv_split"),
    R(f"{_VL}self_attention.linear_qkv.bias",           (f"{_NVL}attention.q_proj.bias",
                                                         f"{_NVL}attention.k_proj.bias",
                                                         f"{_NVL}attention.v_proj.bias"), "vit_qkv_split",
      when="vit_qkv_bias"),
    R(f"{_VL}self_attention.q_layernorm.weight",        f"{_NVL}attention.q_norm.weight", "vit_qk_norm",
      when="vit_qk_norm"),
    R(f"{_VL}self_attention.k_layernorm.weight",        f"{_NVL}attention.k_norm.weight", "vit_qk_norm",
      when="vit_qk_norm"),
    R(f"{_VL}self_attention.linear_proj.weight",        f"{_NVL}attention.projection_layer.weight", "vit_proj_columns"),
    R(f"{_VL}self_attention.linear_proj.bias",          f"{_NVL}attention.projection_layer.bias"),
    R(f"{_VL}self_attn_bda.layer_scale",                f"{_NVL}lambda_1"),
    R(f"{_VL}pre_mlp_layernorm.weight",                 f"{_NVL}layernorm_after.weight"),
    R(f"{_VL}pre_mlp_layernorm.bias",                   f"{_NVL}layernorm_after.bias", when="vit_norm_bias"),
    R(f"{_VL}mlp.linear_fc1.weight",                    f"{_NVL}mlp.fc1.weight"),
    R(f"{_VL}mlp.linear_fc1.bias",                      f"{_NVL}mlp.fc1.bias"),
    R(f"{_VL}mlp.linear_fc2.weight",                    f"{_NVL}mlp.fc2.weight"),
    R(f"{_VL}mlp.linear_fc2.bias",                      f"{_NVL}mlp.fc2.bias"),
    R(f"{_VL}mlp_bda.layer_scale",                      f"{_NVL}lambda_2"),
)

_P = "vision_projection."
PROJECTOR_ORIGINAL = (
    R(f"{_P}norm.weight",                               "mlp1.0.weight"),
    R(f"{_P}norm.bias",                                 "mlp1.0.bias"),
    R(f"{_P}mlp.linear_fc1.weight",                     "mlp1.1.weight"),
    R(f"{_P}mlp.linear_fc1.bias",                       "mlp1.1.bias"),
    R(f"{_P}mlp.linear_fc2.weight",                     "mlp1.3.weight"),
    R(f"{_P}mlp.linear_fc2.bias",                       "mlp1.3.bias"),
)

_NP = "model.multi_modal_projector."
PROJECTOR_NATIVE = (
    R(f"{_P}norm.weight",                               f"{_NP}layer_norm.weight"),
    R(f"{_P}norm.bias",                                 f"{_NP}layer_norm.bias"),
    R(f"{_P}mlp.linear_fc1.weight",                     f"{_NP}linear_1.weight"),
    R(f"{_P}mlp.linear_fc1.bias",                       f"{_NP}linear_1.bias"),
    R(f"{_P}mlp.linear_fc2.weight",                     f"{_NP}linear_2.weight"),
    R(f"{_P}mlp.linear_fc2.bias",                       f"{_NP}linear_2.bias"),
)

_L = "language_model."
_LL = "language_model.decoder.layers.{i}."
_QL = "language_model.model.layers.{i}."

QWEN2_ORIGINAL = (
    R(f"{_L}embedding.word_embeddings.weight",          "language_model.model.embed_tokens.weight", "vocab_rows"),
    R(f"{_LL}input_layernorm.weight",                   f"{_QL}input_layernorm.weight"),
    R(f"{_LL}self_attention.linear_qkv.weight",         (f"{_QL}self_attn.q_proj.weight",
                                                         f"{_QL}self_attn.k_proj.weight",
                                                         f"{_QL}self_attn.v_proj.weight"), "gqa_qkv"),
    R(f"{_LL}self_attention.linear_qkv.bias",           (f"{_QL}self_attn.q_proj.bias",
                                                         f"{_QL}self_attn.k_proj.bias",
                                                         f"{_QL}self_attn.v_proj.bias"), "gqa_qkv",
      when="llm_qkv_bias"),
    R(f"{_LL}self_attention.linear_proj.weight",        f"{_QL}self_attn.o_proj.weight"),
    R(f"{_LL}pre_mlp_layernorm.weight",                 f"{_QL}post_attention_layernorm.weight"),
    R(f"{_LL}mlp.linear_fc1.weight",                    (f"{_QL}mlp.gate_proj.weight",
                                                         f"{_QL}mlp.up_proj.weight"), "swiglu_fc1"),
    R(f"{_LL}mlp.linear_fc2.weight",                    f"{_QL}mlp.down_proj.weight"),
    R(f"{_L}decoder.final_layernorm.weight",            "language_model.model.norm.weight"),
    R(f"{_L}output_layer.weight",                       "language_model.lm_head.weight", "vocab_rows"),
)

_IL = "language_model.model.layers.{i}."
INTERNLM2_ORIGINAL = (
    R(f"{_L}embedding.word_embeddings.weight",          "language_model.model.tok_embeddings.weight", "vocab_rows"),
    R(f"{_LL}input_layernorm.weight",                   f"{_IL}attention_norm.weight"),
    R(f"{_LL}self_attention.linear_qkv.weight",         f"{_IL}attention.wqkv.weight", "kv_grouped_qkv"),
    R(f"{_LL}self_attention.linear_proj.weight",        f"{_IL}attention.wo.weight"),
    R(f"{_LL}pre_mlp_layernorm.weight",                 f"{_IL}ffn_norm.weight"),
    R(f"{_LL}mlp.linear_fc1.weight",                    (f"{_IL}feed_forward.w1.weight",
                                                         f"{_IL}feed_forward.w3.weight"), "swiglu_fc1"),
    R(f"{_LL}mlp.linear_fc2.weight",                    f"{_IL}feed_forward.w2.weight"),
    R(f"{_L}decoder.final_layernorm.weight",            "language_model.model.norm.weight"),
    R(f"{_L}output_layer.weight",                       "language_model.output.weight", "vocab_rows"),
)

_NL = "model.language_model.layers.{i}."
# transformers' Qwen2 and Llama (InternLM2's native form) share these names.
LANGUAGE_NATIVE = (
    R(f"{_L}embedding.word_embeddings.weight",          "model.language_model.embed_tokens.weight", "vocab_rows"),
    R(f"{_LL}input_layernorm.weight",                   f"{_NL}input_layernorm.weight"),
    R(f"{_LL}self_attention.linear_qkv.weight",         (f"{_NL}self_attn.q_proj.weight",
                                                         f"{_NL}self_attn.k_proj.weight",
                                                         f"{_NL}self_attn.v_proj.weight"), "gqa_qkv"),
    R(f"{_LL}self_attention.linear_qkv.bias",           (f"{_NL}self_attn.q_proj.bias",
                                                         f"{_NL}self_attn.k_proj.bias",
                                                         f"{_NL}self_attn.v_proj.bias"), "gqa_qkv",
      when="llm_qkv_bias"),
    R(f"{_LL}self_attention.linear_proj.weight",        f"{_NL}self_attn.o_proj.weight"),
    R(f"{_LL}pre_mlp_layernorm.weight",                 f"{_NL}post_attention_layernorm.weight"),
    R(f"{_LL}mlp.linear_fc1.weight",                    (f"{_NL}mlp.gate_proj.weight",
                                                         f"{_NL}mlp.up_proj.weight"), "swiglu_fc1"),
    R(f"{_LL}mlp.linear_fc2.weight",                    f"{_NL}mlp.down_proj.weight"),
    R(f"{_L}decoder.final_layernorm.weight",            "model.language_model.norm.weight"),
    R(f"{_L}output_layer.weight",                       "lm_head.weight", "vocab_rows"),
)

# transformers' save_pretrained writes InternVL (a llava-style model) with these older prefixes
# and renames them back on load (conversion_mapping "llava"): (state-dict prefix, file prefix).
NATIVE_FILE_PREFIXES = (
    ("model.language_model.",                           "language_model.model."),
    ("lm_head.",                                        "language_model.lm_head."),
    ("model.vision_tower.",                             "vision_tower."),
    ("model.multi_modal_projector.",                    "multi_modal_projector."),
)
# fmt: on

TABLES: dict[str, dict[str, tuple[tuple[Rule, ...], ...]]] = {
    "original": {
        "qwen2": (VISION_ORIGINAL, PROJECTOR_ORIGINAL, QWEN2_ORIGINAL),
        "internlm2": (VISION_ORIGINAL, PROJECTOR_ORIGINAL, INTERNLM2_ORIGINAL),
    },
    "native": {
        "qwen2": (VISION_NATIVE, PROJECTOR_NATIVE, LANGUAGE_NATIVE),
        "internlm2": (VISION_NATIVE, PROJECTOR_NATIVE, LANGUAGE_NATIVE),
    },
}
"""Tables by HF layout, then LLM family: (vision, projector, language)."""

HF_LAYOUTS = tuple(TABLES)


def table_for(layout: str, family: str) -> tuple[Rule, ...]:
    """All rows of one layout and family, each tagged with the layer stack `{i}` runs over."""
    if layout not in TABLES:
        raise ValueError(f"unknown HF layout {layout!r}; use one of {HF_LAYOUTS}")
    vision, projector, language = TABLES[layout][family]
    return (
        *_tag(vision, "vision"),
        *projector,
        *_tag(language, "language"),
    )


def _tag(rules: Iterable[Rule], layers: str) -> tuple[Rule, ...]:
    return tuple(
        Rule(r.megatron, r.hf, r.transform, r.when, layers if "{i}" in r.megatron else None)
        for r in rules
    )


def retarget(
    rules: Iterable[Rule], hf_prefix: str, new_prefix: str, transform: dict[str, str] | None = None
) -> tuple[Rule, ...]:
    """Rows whose HF names start with `hf_prefix`, renamed to `new_prefix` (e.g. the original
    table's `vision_model.` rows as a bare InternViT checkpoint's names); `transform` swaps
    transforms by name."""
    swap = transform or {}
    out = []
    for r in rules:
        if not all(name.startswith(hf_prefix) for name in r.hf):
            continue
        hf = tuple(new_prefix + name[len(hf_prefix) :] for name in r.hf)
        out.append(Rule(r.megatron, hf, swap.get(r.transform, r.transform), r.when, r.layers))
    return tuple(out)


@dataclass(frozen=True)
class Entry:
    """A concrete row: one Megatron parameter, its HF tensors and the transform between."""

    megatron: str
    hf: tuple[str, ...]
    transform: str


def expand(rules: Iterable[Rule], spec: InternVLSpec) -> list[Entry]:
    """Rows for `spec`: `{i}` over its layers, `when` rows only where the feature is present."""
    have = features_of(spec)
    counts = {"vision": spec.vision.num_layers, "language": spec.language.num_layers}
    entries = []
    for r in rules:
        if r.when is not None and r.when not in FEATURES:
            raise ValueError(f"mapping row {r.megatron}: unknown feature {r.when!r}")
        if r.when is not None and r.when not in have:
            continue
        for i in range(counts[r.layers]) if r.layers else [None]:
            entries.append(
                Entry(
                    r.megatron.format(i=i),
                    tuple(name.format(i=i) for name in r.hf),
                    r.transform,
                )
            )
    return entries


def native_file_name(state_dict_name: str) -> str:
    """The name transformers' save_pretrained gives a native state-dict tensor in the file."""
    for state_prefix, file_prefix in NATIVE_FILE_PREFIXES:
        if state_dict_name.startswith(state_prefix):
            return file_prefix + state_dict_name[len(state_prefix) :]
    return state_dict_name


def native_state_dict_name(file_name: str) -> str:
    """The state-dict name of a tensor in a native checkpoint file (either spelling)."""
    for state_prefix, file_prefix in NATIVE_FILE_PREFIXES:
        if file_name.startswith(file_prefix):
            return state_prefix + file_name[len(file_prefix) :]
    return file_name
