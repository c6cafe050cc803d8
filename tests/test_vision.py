"""InternViT, pixel shuffle and the projector equal transformers' InternVL on the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import InternVLConfig, InternVLModel

from megatron_internvl.models.vision import (
    InternViT,
    VisionProjector,
    pixel_shuffle,
    projector_config,
    vision_transformer_config,
)
from megatron_internvl.models.vision_config import VisionConfig
from megatron_internvl.parallel.layout import ParallelLayout
from tests.hf_vision_weights import load_hf_projector_into_ours, load_hf_vision_into_ours

VIT_300M_STYLE = VisionConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    head_dim=8,
    ffn_hidden_size=64,
    norm="LayerNorm",
    qkv_bias=True,
    qk_norm=False,
    image_size=56,
    patch_size=14,
)
VIT_6B_STYLE = VisionConfig(
    num_layers=2,
    hidden_size=40,
    num_attention_heads=5,
    head_dim=8,
    ffn_hidden_size=80,
    norm="RMSNorm",
    qkv_bias=False,
    qk_norm=True,
    image_size=56,
    patch_size=14,
)
LANGUAGE_HIDDEN = 48


def _reference_pixel_shuffle(x, scale_factor=0.5):
    """InternVL's own pixel_shuffle (ps_version v2), transcribed from InternVLChatModel."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(
        n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor))
    )
    return x.permute(0, 2, 1, 3).contiguous()


def test_pixel_shuffle_matches_internvl_reference_and_channel_order():
    x = torch.randn(2, 32, 32, 6)
    out = pixel_shuffle(x)
    assert out.shape == (2, 16, 16, 24)
    torch.testing.assert_close(out, _reference_pixel_shuffle(x), rtol=0, atol=0)
    # Output token (m, j) stacks [x[2m,2j], x[2m,2j+1], x[2m+1,2j], x[2m+1,2j+1]] channel blocks.
    m, j = 3, 5
    expected = torch.cat(
        [
            x[0, 2 * m, 2 * j],
            x[0, 2 * m, 2 * j + 1],
            x[0, 2 * m + 1, 2 * j],
            x[0, 2 * m + 1, 2 * j + 1],
        ]
    )
    torch.testing.assert_close(out[0, m, j], expected, rtol=0, atol=0)


def _hf_model(vision: VisionConfig) -> InternVLModel:
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=vision.hidden_size,
            num_hidden_layers=vision.num_layers,
            num_attention_heads=vision.num_attention_heads,
            intermediate_size=vision.ffn_hidden_size,
            attention_bias=vision.qkv_bias,
            use_qk_norm=vision.qk_norm,
            norm_type="layer_norm" if vision.norm == "LayerNorm" else "rms_norm",
            layer_norm_eps=vision.norm_eps,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
        ),
        text_config=dict(
            model_type="qwen2",
            hidden_size=LANGUAGE_HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=64,
        ),
    )
    torch.manual_seed(0)
    model = InternVLModel(config).eval()
    with torch.no_grad():  # non-trivial layer scales and norm weights
        for name, param in model.named_parameters():
            if "lambda" in name or "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("vision", [VIT_300M_STYLE, VIT_6B_STYLE], ids=["300m", "6b"])
@pytest.mark.parametrize("pad_heads_to", [None, 2], ids=["unpadded", "padded"])
def test_vit_and_projector_match_transformers(single_rank, vision, pad_heads_to):
    hf = _hf_model(vision)
    layout = ParallelLayout()
    overrides = {}
    heads = vision.num_attention_heads
    if pad_heads_to and heads % pad_heads_to:
        heads = heads + pad_heads_to - heads % pad_heads_to  # dummy heads, as under TP
        overrides = {"num_attention_heads": heads, "num_query_groups": heads}
    elif pad_heads_to:
        pytest.skip("head count already divisible")
    ours = InternViT(vision_transformer_config(vision, layout, **overrides), vision).eval()
    load_hf_vision_into_ours(ours, hf.vision_tower, padded_heads=heads)
    projector = VisionProjector(
        projector_config(LANGUAGE_HIDDEN, layout), input_size=4 * vision.hidden_size
    ).eval()
    load_hf_projector_into_ours(projector, hf.multi_modal_projector)

    # Two tile sizes: the trained grid and an interpolated one (bicubic position embedding).
    for side in (56, 84):
        pixels = torch.randn(3, 3, side, side)
        with torch.no_grad():
            expected = hf.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
            features = ours(pixels)
        torch.testing.assert_close(features, expected, atol=2e-5, rtol=1e-4)

    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        expected = hf.get_image_features(pixel_values=pixels).pooler_output
        grid = vision.grid_size
        shuffled = pixel_shuffle(ours(pixels).reshape(3, grid, grid, -1))
        projected = projector(shuffled.flatten(1, 2))
    torch.testing.assert_close(projected, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("vision", [VIT_300M_STYLE, VIT_6B_STYLE], ids=["300m", "6b"])
def test_sequence_padding_for_fp8_is_masked(single_rank, vision):
    """The 17-token tile sequence padded to 32 (what FP8 alignment does) changes no output."""
    hf = _hf_model(vision)
    ours = InternViT(vision_transformer_config(vision, ParallelLayout()), vision).eval()
    load_hf_vision_into_ours(ours, hf.vision_tower, padded_heads=vision.num_attention_heads)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = hf.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
        ours.seq_pad_multiple = 16
        padded = ours(pixels)
    torch.testing.assert_close(padded, expected, atol=2e-5, rtol=1e-4)


def test_drop_path_drops_whole_samples_with_linspace_rates(single_rank):
    from megatron_internvl.models.specs import BACKENDS
    from megatron_internvl.models.vision import ScaledResidual, internvit_layer_spec

    vision = VisionConfig(**{**VIT_300M_STYLE.__dict__, "num_layers": 5, "drop_path_rate": 0.4})
    assert internvit_layer_spec(vision, BACKENDS["local"]).params["drop_path_rates"] == (
        pytest.approx((0.0, 0.1, 0.2, 0.3, 0.4))
    )
    config = vision_transformer_config(vision, ParallelLayout())
    residual_branch = ScaledResidual(config, init=0.5, drop_path=0.5)
    x, residual = torch.randn(7, 64, 32), torch.randn(7, 64, 32)
    torch.manual_seed(0)
    out = residual_branch(True, False)((x, None), residual, 0.0)
    kept = (out - residual).abs().amax(dim=(0, 2)) > 0  # per sample (dim 1 is the batch)
    assert 10 < int(kept.sum()) < 54  # about half the samples keep the branch
    torch.testing.assert_close(out[:, kept], residual[:, kept] + x[:, kept] * 0.5 / 0.5)
    torch.testing.assert_close(out[:, ~kept], residual[:, ~kept])
    evaluated = residual_branch(False, False)((x, None), residual, 0.0)
    torch.testing.assert_close(evaluated, residual + 0.5 * x)
