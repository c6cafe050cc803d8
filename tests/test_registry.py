"""Every registry flavour has its model card's parameter count, identical by a hand formula and by
transformers' own InternVL on the meta device, and invalid specs fail with an actionable message."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest

pytest.importorskip("transformers")

from megatron_internvl.models.language import LanguageConfig
from megatron_internvl.models.registry import REGISTRY, InternVLSpec, get_spec
from megatron_internvl.models.vision_config import (
    INTERNVIT_6B,
    INTERNVIT_300M,
    VisionConfig,
)
from tests.hf_oracle import (
    build_hf_model,
    hf_internvl_config,
    hf_parameter_counts,
)

# Model-card sizes in billions, as printed (the digits shown are the precision checked).
MODEL_CARD_BILLIONS = {
    "internvl2_5_1b": "0.94",
    "internvl2_5_2b": "2.21",
    "internvl2_5_4b": "3.71",
    "internvl2_5_8b": "8.08",
    "internvl2_5_26b": "25.5",
    "internvl2_5_38b": "38.4",
    "internvl2_5_78b": "78.4",
}

# Measured with transformers 5.24; pinned so any change to a spec is caught to the parameter.
EXACT_COUNTS = {
    "internvl2_5_1b": (304_012_288, 4_482_816, 629_697_920, 938_193_024),
    "internvl2_5_2b": (304_012_288, 12_595_200, 1_889_146_880, 2_205_754_368),
    "internvl2_5_4b": (304_012_288, 12_595_200, 3_396_030_464, 3_712_637_952),
    "internvl2_5_8b": (304_012_288, 33_570_816, 7_737_782_272, 8_075_365_376),
    "internvl2_5_26b": (5_536_496_000, 116_429_824, 19_861_260_288, 25_514_186_112),
    "internvl2_5_38b": (5_536_496_000, 91_786_240, 32_759_882_752, 38_388_164_992),
    "internvl2_5_78b": (5_536_496_000, 172_008_448, 72_699_813_888, 78_408_318_336),
    "tiny_qwen_300m_style": (44_960, 12_672, 186_944, 244_576),
    "tiny_internlm_6b_style": (63_640, 14_784, 186_432, 264_856),
}


def hand_counts(spec: InternVLSpec) -> dict[str, int]:
    """Parameter counts from the spec fields alone, following the original InternVL modules."""
    v = spec.vision
    c, f = v.hidden_size, v.ffn_hidden_size
    norm = 2 * c if v.norm == "LayerNorm" else c  # LayerNorm has a bias, RMSNorm does not
    vit_embed = c + (v.num_patches + 1) * c + 3 * v.patch_size**2 * c + c  # cls, pos, conv w+b
    vit_layer = (
        3 * c * c  # fused qkv
        + (3 * c if v.qkv_bias else 0)
        + (2 * c if v.qk_norm else 0)  # q_norm, k_norm over the full width
        + (c * c + c)  # proj
        + (c * f + f)
        + (f * c + c)  # fc1, fc2
        + 2 * norm  # norm1, norm2
        + 2 * c  # ls1, ls2
    )
    vision = vit_embed + v.num_layers * vit_layer  # no final norm

    lang = spec.language
    h, ffn, vocab = lang.hidden_size, lang.ffn_hidden_size, lang.vocab_size
    hd = lang.kv_channels or h // lang.num_attention_heads
    q, kv = lang.num_attention_heads * hd, lang.num_query_groups * hd
    proj_in = 4 * c
    projector = 2 * proj_in + proj_in * h + h + h * h + h  # LayerNorm, Linear, Linear
    llm_layer = (
        h * (q + 2 * kv)
        + ((q + 2 * kv) if lang.qkv_bias else 0)
        + q * h  # o_proj, no bias in either family
        + 3 * h * ffn  # SwiGLU gate, up, down
        + 2 * h  # two RMSNorms
    )
    language = vocab * h + lang.num_layers * llm_layer + h + vocab * h  # untied lm_head
    return {
        "vision": vision,
        "projector": projector,
        "language": language,
        "total": vision + projector + language,
    }


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, int]]:
    return {name: hf_parameter_counts(spec) for name, spec in REGISTRY.items()}


def test_registry_names() -> None:
    assert set(REGISTRY) == set(EXACT_COUNTS)
    assert all(spec.name == name for name, spec in REGISTRY.items())


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_hand_formula_matches_transformers(name: str, measured: dict) -> None:
    assert hand_counts(REGISTRY[name]) == measured[name]


@pytest.mark.parametrize("name", sorted(EXACT_COUNTS))
def test_exact_counts(name: str, measured: dict) -> None:
    vision, projector, language, total = EXACT_COUNTS[name]
    expected = {"vision": vision, "projector": projector, "language": language, "total": total}
    assert measured[name] == expected


@pytest.mark.parametrize("name", sorted(MODEL_CARD_BILLIONS))
def test_model_card_size(name: str, measured: dict) -> None:
    card = MODEL_CARD_BILLIONS[name]
    digits = len(card.split(".")[1])
    assert f"{measured[name]['total'] / 1e9:.{digits}f}" == card


def test_released_vit_sizes(measured: dict) -> None:
    # InternViT-300M / InternViT-6B model cards: 304M and 5.5B (5,536,496,000 exactly here).
    assert round(measured["internvl2_5_1b"]["vision"] / 1e6) == 304
    assert f"{measured['internvl2_5_78b']['vision'] / 1e9:.1f}" == "5.5"


# transformers name -> original InternViT name (the inverse of the transformers conversion map).
_TO_ORIGINAL = [
    (r"^model\.vision_tower\.", "vision_model."),
    (r"\.layer\.", ".layers."),
    (r"embeddings\.cls_token$", "embeddings.class_embedding"),
    (r"embeddings\.position_embeddings$", "embeddings.position_embedding"),
    (r"embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
    (r"\.lambda_(\d)$", r".ls\1"),
    (r"\.attention\.projection_layer\.", ".attn.proj."),
    (r"\.attention\.[qkv]_proj\.", ".attn.qkv."),  # three splits of the fused qkv
    (r"\.attention\.", ".attn."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
]


def _original_vit_shapes(spec: InternVLSpec) -> dict[str, tuple[int, ...]]:
    """InternViT parameter names and shapes (qkv re-fused) from transformers' vision tower."""
    shapes: dict[str, list[int]] = {}
    for name, p in build_hf_model(spec).named_parameters():
        if not name.startswith("model.vision_tower."):
            continue
        for pattern, repl in _TO_ORIGINAL:
            name = re.sub(pattern, repl, name)
        if ".attn.qkv." in name and name in shapes:
            shapes[name][0] += p.shape[0]
        else:
            shapes[name] = list(p.shape)
    return {k: tuple(s) for k, s in shapes.items()}


@pytest.mark.parametrize("name", ["internvl2_5_8b", "internvl2_5_78b"])
def test_vision_tower_is_internvit(name: str) -> None:
    spec = REGISTRY[name]
    v = spec.vision
    c, f = v.hidden_size, v.ffn_hidden_size
    expected = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.position_embedding": (1, 1025, c),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, 14, 14),
        "vision_model.embeddings.patch_embedding.bias": (c,),
    }
    layer = {
        "attn.qkv.weight": (3 * c, c),
        "attn.proj.weight": (c, c),
        "attn.proj.bias": (c,),
        "mlp.fc1.weight": (f, c),
        "mlp.fc1.bias": (f,),
        "mlp.fc2.weight": (c, f),
        "mlp.fc2.bias": (c,),
        "norm1.weight": (c,),
        "norm2.weight": (c,),
        "ls1": (c,),
        "ls2": (c,),
    }
    if v.qkv_bias:
        layer["attn.qkv.bias"] = (3 * c,)
    if v.qk_norm:
        layer["attn.q_norm.weight"] = layer["attn.k_norm.weight"] = (c,)
    if v.norm == "LayerNorm":
        layer["norm1.bias"] = layer["norm2.bias"] = (c,)
    for i in range(v.num_layers):
        expected.update({f"vision_model.encoder.layers.{i}.{k}": s for k, s in layer.items()})
    assert _original_vit_shapes(spec) == expected


def test_llm_attention_biases() -> None:
    qwen = {n for n, _ in build_hf_model(get_spec("tiny_qwen_300m_style")).named_parameters()}
    attn = "model.language_model.layers.0.self_attn"
    assert {f"{attn}.{p}_proj.bias" for p in "qkv"} <= qwen
    assert f"{attn}.o_proj.bias" not in qwen
    internlm = {n for n, _ in build_hf_model(get_spec("tiny_internlm_6b_style")).named_parameters()}
    assert not [n for n in internlm if n.startswith("model.language_model.") and "bias" in n]
    assert not [
        n for n in qwen | internlm if ".mlp." in n and "language_model" in n and "bias" in n
    ]


def test_hf_config_fields() -> None:
    spec = get_spec("internvl2_5_26b")
    cfg = hf_internvl_config(spec)
    assert cfg.text_config.model_type == "llama"
    assert hf_internvl_config(get_spec("internvl2_5_38b")).text_config.model_type == "qwen2"
    assert cfg.image_token_id == 92546 and cfg.downsample_ratio == 0.5
    assert cfg.image_seq_length == 256 and cfg.vision_feature_layer == -1
    assert not cfg.tie_word_embeddings and not cfg.text_config.tie_word_embeddings
    assert cfg.text_config.rope_parameters["rope_theta"] == 5e7
    assert cfg.text_config.rms_norm_eps == 1e-5 and cfg.text_config.head_dim == 128
    vc = cfg.vision_config
    assert vc.norm_type == "rms_norm" and vc.use_qk_norm and not vc.attention_bias
    assert vc.use_mean_pooling  # i.e. no final LayerNorm, as in InternViT
    assert hf_internvl_config(get_spec("internvl2_5_8b")).text_config.rope_parameters == {
        "rope_type": "dynamic",
        "factor": 2.0,
        "rope_theta": 1e6,
    }


def test_tile_geometry() -> None:
    assert INTERNVIT_300M.num_patches == INTERNVIT_6B.num_patches == 1024
    for name in MODEL_CARD_BILLIONS:
        assert get_spec(name).tokens_per_tile == 256
    for name in ("tiny_qwen_300m_style", "tiny_internlm_6b_style"):
        assert get_spec(name).vision.num_patches == 16
        assert get_spec(name).tokens_per_tile == 4
    assert get_spec("tiny_internlm_6b_style").vision.num_attention_heads % 2 == 1


def test_image_token_ids() -> None:
    for name, spec in REGISTRY.items():
        if name in MODEL_CARD_BILLIONS:
            expected = 151667 if spec.llm_family == "qwen2" else 92546
            assert spec.image_token_id == expected


def test_building_78b_on_meta_is_fast() -> None:
    build_hf_model(get_spec("tiny_qwen_300m_style"))  # first-use overheads out of the timing
    start = time.perf_counter()
    hf_parameter_counts(get_spec("internvl2_5_78b"))
    assert time.perf_counter() - start < 10.0


def test_get_spec_unknown_name_lists_known() -> None:
    with pytest.raises(KeyError) as err:
        get_spec("internvl2_5_7b")
    message = str(err.value)
    assert "internvl2_5_7b" in message
    assert all(name in message for name in REGISTRY)


def test_specs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_spec("internvl2_5_1b").name = "other"  # type: ignore[misc]


def _tiny() -> InternVLSpec:
    return get_spec("tiny_qwen_300m_style")


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(num_attention_heads=3), "num_attention_heads \\* head_dim"),
        (dict(head_dim=16), "set head_dim"),
        (dict(norm="BatchNorm"), "norm must be one of"),
        (dict(image_size=50), "multiple of patch_size"),
        (dict(num_layers=0), "num_layers must be positive"),
    ],
)
def test_vision_validation(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(_tiny().vision, **change)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            dict(language=dataclasses.replace(_tiny().language, num_query_groups=3)),
            "multiple of language.num_query_groups",
        ),
        (
            dict(language=dataclasses.replace(_tiny().language, qkv_bias=False)),
            "set language.qkv_bias",
        ),
        (dict(llm_family="llama"), "llm_family must be one of"),
        (dict(image_token_id=300), "image_token_id 300"),
        (dict(downsample_ratio=0.3), "downsample_ratio must be 1/k"),
        (dict(downsample_ratio=1 / 3), "not divisible by 1/downsample_ratio"),
        (dict(rope_dynamic_factor=0.5), "rope_dynamic_factor"),
        (
            dict(language=LanguageConfig(2, 66, 4, 2, 128, 300)),
            "set language.kv_channels",
        ),
    ],
)
def test_spec_validation(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(_tiny(), **change)


def test_vision_config_requires_keywords() -> None:
    with pytest.raises(TypeError):
        VisionConfig(2, 32, 4, 128, 8, "LayerNorm", 1e-6, True, False)  # type: ignore[misc]
