"""HF `config.json` files: recognise a checkpoint's layout and family, and write one for a flavour.

Recognised `architectures` (what the loaders of each family need):
- "InternVLChatModel": the original layout (OpenGVLab remote code), `llm_config.architectures`
  says the LLM family;
- "InternVLForConditionalGeneration": transformers' native layout, `text_config.model_type`
  "qwen2" or "llama" (InternLM2 converted);
- "InternVisionModel", "Qwen2ForCausalLM", "InternLM2ForCausalLM": the separate pieces a stage-1
  model is made of.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_internvl.checkpoint.errors import ConversionError
from megatron_internvl.models.registry import InternVLSpec

ORIGINAL_ARCH = "InternVLChatModel"
NATIVE_ARCH = "InternVLForConditionalGeneration"
VISION_ARCH = "InternVisionModel"
LLM_ARCHS = {"Qwen2ForCausalLM": "qwen2", "InternLM2ForCausalLM": "internlm2"}
_NATIVE_TEXT_TYPES = {"qwen2": "qwen2", "llama": "internlm2"}


def read_config(hf_dir: Path) -> dict[str, Any]:
    """`hf_dir/config.json` as a dict, with an error that says what is missing."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"{hf_dir}: no config.json; an HF checkpoint directory holds config.json next to its "
            f"*.safetensors files (pass the directory save_pretrained wrote)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path}: not valid JSON ({error})") from error


def _architecture(config: dict[str, Any], where: str, expected: list[str]) -> str:
    archs = config.get("architectures") or []
    known = [a for a in archs if a in expected]
    if not known:
        raise ConversionError(
            f"{where}: unknown architecture {archs or '(none given)'}; expected one of {expected}. "
            f"Pass an InternVL checkpoint (original InternVLChatModel or transformers' "
            f"InternVLForConditionalGeneration) or, for stage-1 imports, an InternViT and a "
            f"Qwen2/InternLM2 checkpoint"
        )
    return known[0]


def detect_internvl(config: dict[str, Any], where: str) -> tuple[str, str]:
    """(layout, llm family) of a full InternVL checkpoint's config."""
    arch = _architecture(config, where, [ORIGINAL_ARCH, NATIVE_ARCH])
    if arch == ORIGINAL_ARCH:
        llm_archs = (config.get("llm_config") or {}).get("architectures") or []
        family = next((LLM_ARCHS[a] for a in llm_archs if a in LLM_ARCHS), None)
        if family is None:
            raise ConversionError(
                f"{where}: llm_config.architectures is {llm_archs}; expected one of "
                f"{sorted(LLM_ARCHS)}"
            )
        return "original", family
    text_type = (config.get("text_config") or {}).get("model_type")
    if text_type not in _NATIVE_TEXT_TYPES:
        raise ConversionError(
            f"{where}: text_config.model_type is {text_type!r}; expected one of "
            f"{sorted(_NATIVE_TEXT_TYPES)}"
        )
    return "native", _NATIVE_TEXT_TYPES[text_type]


def detect_llm(config: dict[str, Any], where: str) -> str:
    """LLM family of a bare Qwen2 / InternLM2 checkpoint's config."""
    return LLM_ARCHS[_architecture(config, where, sorted(LLM_ARCHS))]


def check_vision(config: dict[str, Any], where: str) -> None:
    _architecture(config, where, [VISION_ARCH])


def check_family(found: str, spec: InternVLSpec, where: str) -> None:
    if found != spec.llm_family:
        raise ConversionError(
            f"{where}: the checkpoint's LLM is {found}, but flavour {spec.name!r} has a "
            f"{spec.llm_family} LLM; pick a flavour of the same family"
        )


def native_config(spec: InternVLSpec, dtype: str) -> Any:
    """transformers' InternVLConfig for `spec` (needs transformers: the `dev` extra)."""
    try:
        import transformers
    except ImportError as error:
        raise ConversionError(
            "writing the native layout needs transformers (pip install -e .[dev]); "
            "or write hf_layout='original'"
        ) from error
    lang, vit = spec.language, spec.vision
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": lang.rope_theta}
    if spec.rope_dynamic_factor is not None:
        rope = {
            "rope_type": "dynamic",
            "factor": spec.rope_dynamic_factor,
            "rope_theta": lang.rope_theta,
        }
    text = dict(
        vocab_size=lang.vocab_size,
        hidden_size=lang.hidden_size,
        intermediate_size=lang.ffn_hidden_size,
        num_hidden_layers=lang.num_layers,
        num_attention_heads=lang.num_attention_heads,
        num_key_value_heads=lang.num_query_groups,
        head_dim=lang.kv_channels or lang.hidden_size // lang.num_attention_heads,
        hidden_act="silu",
        rms_norm_eps=lang.norm_eps,
        rope_parameters=rope,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    )
    if spec.llm_family == "qwen2":
        text_config = transformers.Qwen2Config(**text)
    else:  # InternLM2's single `bias` flag covers q/k/v and o, like Llama's attention_bias
        text_config = transformers.LlamaConfig(**text, attention_bias=lang.qkv_bias, mlp_bias=False)
    vision_config = transformers.InternVLVisionConfig(
        hidden_size=vit.hidden_size,
        num_hidden_layers=vit.num_layers,
        num_attention_heads=vit.num_attention_heads,
        intermediate_size=vit.ffn_hidden_size,
        hidden_act="gelu",
        attention_bias=vit.qkv_bias,
        use_qk_norm=vit.qk_norm,
        norm_type="layer_norm" if vit.norm == "LayerNorm" else "rms_norm",
        layer_norm_eps=vit.norm_eps,
        image_size=vit.image_size,
        patch_size=vit.patch_size,
        layer_scale_init_value=vit.layer_scale_init,
        use_mask_token=False,
        use_absolute_position_embeddings=True,
        use_mean_pooling=True,  # "no final LayerNorm", as in InternViT
    )
    config = transformers.InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=spec.image_token_id,
        image_seq_length=spec.tokens_per_tile,
        downsample_ratio=spec.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config.architectures = [NATIVE_ARCH]
    config.dtype = dtype
    return config


def native_config_dict(spec: InternVLSpec, dtype: str) -> dict[str, Any]:
    config = native_config(spec, dtype)
    out = config.to_dict()
    out["torch_dtype"] = dtype  # transformers 4.x reads torch_dtype, 5.x dtype
    out["dtype"] = dtype
    return out


def original_config_dict(spec: InternVLSpec, dtype: str) -> dict[str, Any]:
    """InternVLChatConfig-style config.json of the original layout (InternVL 2.5 settings)."""
    lang, vit = spec.language, spec.vision
    vision_config = {
        "architectures": [VISION_ARCH],
        "model_type": "intern_vit_6b",
        "hidden_size": vit.hidden_size,
        "num_hidden_layers": vit.num_layers,
        "num_attention_heads": vit.num_attention_heads,
        "intermediate_size": vit.ffn_hidden_size,
        "qkv_bias": vit.qkv_bias,
        "qk_normalization": vit.qk_norm,
        "norm_type": "layer_norm" if vit.norm == "LayerNorm" else "rms_norm",
        "layer_norm_eps": vit.norm_eps,
        "image_size": vit.image_size,
        "patch_size": vit.patch_size,
        "num_channels": 3,
        "hidden_act": "gelu",
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "initializer_factor": vit.layer_scale_init,
        "initializer_range": 0.02,
        "use_flash_attn": True,
        "torch_dtype": dtype,
    }
    llm_config: dict[str, Any] = {
        "hidden_size": lang.hidden_size,
        "intermediate_size": lang.ffn_hidden_size,
        "num_hidden_layers": lang.num_layers,
        "num_attention_heads": lang.num_attention_heads,
        "num_key_value_heads": lang.num_query_groups,
        "rms_norm_eps": lang.norm_eps,
        "rope_theta": lang.rope_theta,
        "vocab_size": lang.vocab_size,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if spec.llm_family == "qwen2":
        llm_config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    else:
        llm_config.update(
            architectures=["InternLM2ForCausalLM"],
            model_type="internlm2",
            bias=lang.qkv_bias,
            attn_implementation="eager",
        )
        if spec.rope_dynamic_factor is not None:
            llm_config["rope_scaling"] = {"type": "dynamic", "factor": spec.rope_dynamic_factor}
    # No auto_map: the model code (modeling_internvl_chat.py ...) is InternVL's, not shipped
    # here; the README says how to load this layout with it.
    return {
        "architectures": [ORIGINAL_ARCH],
        "model_type": "internvl_chat",
        "vision_config": vision_config,
        "llm_config": llm_config,
        "downsample_ratio": spec.downsample_ratio,
        "template": "internvl2_5",
        "ps_version": "v2",
        "select_layer": -1,
        "force_image_size": vit.image_size,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }


# --- the model shape from a config.json (any InternVL-architecture checkpoint) ----------------

_IMG_CONTEXT = "<IMG_CONTEXT>"


def _side(value: Any) -> int:
    """image_size / patch_size: an int, or [h, w] (transformers) with h == w."""
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ConversionError(f"non-square image or patch size {value} is not supported")
        return int(value[0])
    return int(value)


def _image_token_id(config: dict[str, Any], hf_dir: Path) -> int:
    """From the config (native layout) or the tokenizer files next to it (original layout)."""
    if "image_token_id" in config:
        return int(config["image_token_id"])
    tokenizer = hf_dir / "tokenizer.json"
    if tokenizer.is_file():
        for token in json.loads(tokenizer.read_text()).get("added_tokens", []):
            if token.get("content") == _IMG_CONTEXT:
                return int(token["id"])
    tokenizer_config = hf_dir / "tokenizer_config.json"
    if tokenizer_config.is_file():
        added = json.loads(tokenizer_config.read_text()).get("added_tokens_decoder", {})
        for token_id, token in added.items():
            if token.get("content") == _IMG_CONTEXT:
                return int(token_id)
    raise ConversionError(
        f"{hf_dir}: no image_token_id in config.json and no {_IMG_CONTEXT} token in its "
        "tokenizer files; copy the model's tokenizer files next to config.json"
    )


def _rope(text: dict[str, Any]) -> tuple[float, float | None]:
    """(theta, dynamic-NTK factor or None) from transformers 5 rope_parameters or 4.x fields."""
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or {}
    theta = params.get("rope_theta", text.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    factor = params.get("factor", scaling.get("factor"))
    return float(theta), (float(factor) if kind == "dynamic" else None)


def spec_from_config(config: dict[str, Any], hf_dir: Path | str, name: str) -> InternVLSpec:
    """The InternVLSpec a checkpoint's config.json describes (either layout): what lets any
    InternVL-architecture checkpoint convert without a registered flavour."""
    from megatron_internvl.models.language import LanguageConfig
    from megatron_internvl.models.registry import InternVLSpec
    from megatron_internvl.models.vision_config import VisionConfig

    hf_dir = Path(hf_dir)
    layout, family = detect_internvl(config, str(hf_dir / "config.json"))
    native = layout == "native"
    text = config["text_config" if native else "llm_config"]
    vit = config["vision_config"]
    theta, dynamic = _rope(text)
    heads = int(text["num_attention_heads"])
    hidden = int(text["hidden_size"])
    qkv_bias = family == "qwen2" or bool(text.get("attention_bias" if native else "bias"))
    language = LanguageConfig(
        num_layers=int(text["num_hidden_layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=int(text.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(text["intermediate_size"]),
        vocab_size=int(text["vocab_size"]),
        kv_channels=int(text.get("head_dim") or hidden // heads),
        qkv_bias=qkv_bias,
        norm_eps=float(text["rms_norm_eps"]),
        rope_theta=theta,
    )
    vit_heads = int(vit["num_attention_heads"])
    norm_type = vit.get("norm_type", "rms_norm")
    vision = VisionConfig(
        num_layers=int(vit["num_hidden_layers"]),
        hidden_size=int(vit["hidden_size"]),
        num_attention_heads=vit_heads,
        ffn_hidden_size=int(vit["intermediate_size"]),
        head_dim=int(vit["hidden_size"]) // vit_heads,
        norm="LayerNorm" if norm_type == "layer_norm" else "RMSNorm",
        norm_eps=float(vit["layer_norm_eps"]),
        qkv_bias=bool(vit["attention_bias" if native else "qkv_bias"]),
        qk_norm=bool(vit["use_qk_norm" if native else "qk_normalization"]),
        image_size=_side(vit["image_size"]),
        patch_size=_side(vit["patch_size"]),
        layer_scale_init=float(
            vit.get("layer_scale_init_value" if native else "initializer_factor", 0.1)
        ),
    )
    return InternVLSpec(
        name=name,
        vision=vision,
        language=language,
        llm_family=family,
        downsample_ratio=float(config.get("downsample_ratio", 0.5)),
        image_token_id=_image_token_id(config, hf_dir),
        rope_dynamic_factor=dynamic,
    )
