"""Our original-layout export, read through transformers' own mapping of InternVL's original
layout, is the same model as our transformers-native export.

transformers ships no InternVL conversion script in its wheels (checked 4.52-4.57 and 5.24), but
transformers 5 ships declarative conversion rules for InternVL's original `InternVLChatModel`
layout (`vision_model.*` with fused `attn.qkv`, `ls1/ls2`, `mlp1.*`, `language_model.model.*`),
applied when it loads Qianfan-OCR, an InternVL-architecture model with a Qwen LLM. Loading our
original-layout export with those rules must leave no key unused or missing and give the logits
of transformers' InternVL loaded from our native export. (The rules cover the 300M-style ViT and
a Qwen LLM: InternLM2's fused `wqkv` and the 6B ViT's QK-norm are not among them.)
"""

from __future__ import annotations

import pytest
import torch
import transformers

from megatron_internvl.checkpoint.convert import hf_to_megatron, megatron_to_hf
from tests.convert_cases import make_native, model_inputs

FLAVOUR = "tiny_qwen_300m_style"


def _qianfan_config(native: transformers.InternVLConfig) -> transformers.PreTrainedConfig:
    # The two vision configs name these fields alike.
    shared = (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "attention_bias",
        "use_qk_norm", "intermediate_size", "norm_type", "layer_norm_eps", "image_size",
        "patch_size", "layer_scale_init_value",
    )  # fmt: skip
    v = native.vision_config
    vision = transformers.QianfanOCRVisionConfig(
        **{name: getattr(v, name) for name in shared}, drop_path_rate=0.0
    )
    return transformers.QianfanOCRConfig(
        vision_config=vision,
        text_config=native.text_config.to_dict(),
        image_token_id=native.image_token_id,
        downsample_ratio=native.downsample_ratio,
    )


def test_original_export_through_transformers_mapping_equals_native_export(tmp_path):
    if not hasattr(transformers, "QianfanOCRForConditionalGeneration"):
        pytest.skip("this transformers has no Qianfan-OCR (its InternVL original-layout rules)")
    make_native(FLAVOUR, tmp_path / "hf")
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", FLAVOUR, log=lambda _: None)
    megatron_to_hf(tmp_path / "mg", tmp_path / "original", hf_layout="original", log=print)
    megatron_to_hf(tmp_path / "mg", tmp_path / "native", log=print)

    native = transformers.InternVLForConditionalGeneration.from_pretrained(
        tmp_path / "native", dtype=torch.float32
    ).eval()
    through_mapping, loading = transformers.QianfanOCRForConditionalGeneration.from_pretrained(
        tmp_path / "original",
        config=_qianfan_config(native.config),
        dtype=torch.float32,
        output_loading_info=True,
    )
    assert loading["missing_keys"] == set() and loading["unexpected_keys"] == set()
    assert loading["mismatched_keys"] == set()
    inputs = model_inputs(FLAVOUR)
    with torch.no_grad():
        expected = native(**inputs).logits
        got = through_mapping.eval()(**inputs).logits
    assert torch.equal(got, expected)
