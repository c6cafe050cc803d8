"""transformers' own original -> native InternVL weight conversion, transcribed for a cross-check.

Source: huggingface/transformers, src/transformers/models/internvl/convert_internvl_weights_to_hf.py
(read at commit 015d3b273cbc4a72f2feb1da386896655a23b3da through a code index). The script is
not in the transformers wheel, nor in its PyPI sdists (checked 4.57.1 and 5.24.0: they leave out
the convert_* scripts), so its key regexes and q/k/v splitting are copied verbatim below, plus
the `_checkpoint_conversion_mapping` that transformers 4.5x applied when loading (llava-style
models: legacy file names -> state-dict names). Nothing here is derived from our tables.
"""

from __future__ import annotations

import re

import torch

# fmt: off
ORIGINAL_TO_CONVERTED_KEY_MAPPING_VISION = {
    r"vision_model":                                r"vision_tower",
    r"layers":                                      r"layer",
    r"class_embedding":                             r"cls_token",
    r"position_embedding":                          r"position_embeddings",
    r"patch_embedding":                             r"patch_embeddings.projection",
    r"ls(\d+)":                                     r"lambda_\1",
    r"attn.proj":                                   r"attention.projection_layer",
    r"attn.dropout":                                r"attention.projection_dropout",
    r"attn":                                        r"attention",
    r"norm1":                                       r"layernorm_before",
    r"norm2":                                       r"layernorm_after",
}
ORIGINAL_TO_CONVERTED_KEY_MAPPING_TEXT_LLAMA = {
    r"tok_embeddings":                              r"embed_tokens",
    r"attention.wo":                                r"self_attn.o_proj",
    r"feed_forward.w1":                             r"mlp.gate_proj",
    r"feed_forward.w2":                             r"mlp.down_proj",
    r"feed_forward.w3":                             r"mlp.up_proj",
    r"attention_norm":                              r"input_layernorm",
    r"ffn_norm":                                    r"post_attention_layernorm",
    r"output":                                      r"lm_head",
}
ORIGINAL_TO_CONVERTED_KEY_MAPPING_MULTI = {
    r"mlp1.0":                                 r"multi_modal_projector.layer_norm",
    r"mlp1.1":                                 r"multi_modal_projector.linear_1",
    r"mlp1.3":                                 r"multi_modal_projector.linear_2",
}
# InternVLForConditionalGeneration._checkpoint_conversion_mapping (transformers 4.52-4.57)
CHECKPOINT_CONVERSION_MAPPING = {
    "^language_model.model": "model.language_model",
    "^vision_tower": "model.vision_tower",
    "^multi_modal_projector": "model.multi_modal_projector",
    "^language_model.lm_head": "lm_head",
}
# fmt: on


def _rename(keys: list[str], table: dict[str, str]) -> dict[str, str]:
    # The script joins the keys with newlines and applies each regex to the whole text.
    text = "\n".join(keys)
    for pattern, replacement in table.items():
        text = re.sub(pattern, replacement, text)
    return dict(zip(keys, text.split("\n"), strict=True))


def convert_old_keys_to_new_keys(keys: list[str], lm_type: str) -> dict[str, str]:
    vision = [k for k in keys if k.startswith("vision_model")]
    language = [k for k in keys if k.startswith("language_model")]
    multi = [k for k in keys if not k.startswith(("language_model", "vision_model"))]
    out = _rename(vision, ORIGINAL_TO_CONVERTED_KEY_MAPPING_VISION) if vision else {}
    if language:
        out.update(
            _rename(language, ORIGINAL_TO_CONVERTED_KEY_MAPPING_TEXT_LLAMA)
            if lm_type == "llama"
            else dict(zip(language, language, strict=True))
        )
    if multi:
        out.update(_rename(multi, ORIGINAL_TO_CONVERTED_KEY_MAPPING_MULTI))
    return out


def to_state_dict_name(name: str) -> str:
    for pattern, replacement in CHECKPOINT_CONVERSION_MAPPING.items():
        name, count = re.subn(pattern, replacement, name)
        if count:
            break
    return name


def convert(
    state_dict_old: dict[str, torch.Tensor],
    lm_type: str,
    vision_hidden: int,
    lm_dim: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int,
) -> dict[str, torch.Tensor]:
    """The script's write_model loop; returns state-dict names (after the loading rename)."""
    new_keys = convert_old_keys_to_new_keys(list(state_dict_old), lm_type)
    dim = vision_hidden
    state_dict = {}
    for key, value in state_dict_old.items():
        new_key = new_keys[key]
        if "attn.qkv" in key:
            state_dict[new_key.replace("attention.qkv", "attention.q_proj")] = value[:dim]
            state_dict[new_key.replace("attention.qkv", "attention.k_proj")] = value[dim : 2 * dim]
            state_dict[new_key.replace("attention.qkv", "attention.v_proj")] = value[-dim:]
        elif "attention.wqkv" in key:
            num_key_value_groups = num_attention_heads // num_key_value_heads
            # rearrange(w, "(h gs d) z -> h gs d z", gs=2 + num_key_value_groups, d=head_dim)
            qkv_vecs = value.reshape(-1, 2 + num_key_value_groups, head_dim, value.shape[-1])
            q_proj = qkv_vecs[:, :num_key_value_groups, ...].reshape(-1, lm_dim).contiguous()
            k_proj = qkv_vecs[:, -2, ...].reshape(-1, lm_dim).contiguous()
            v_proj = qkv_vecs[:, -1, ...].reshape(-1, lm_dim).contiguous()
            state_dict[new_key.replace("attention.wqkv", "self_attn.q_proj")] = q_proj
            state_dict[new_key.replace("attention.wqkv", "self_attn.k_proj")] = k_proj
            state_dict[new_key.replace("attention.wqkv", "self_attn.v_proj")] = v_proj
        else:
            state_dict[new_key] = value
    return {to_state_dict_name(k): v for k, v in state_dict.items()}
