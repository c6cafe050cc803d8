"""The model-FLOPs formula (the MFU numerator) equals torch's FlopCounterMode on transformers'
InternVL."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import InternVLForConditionalGeneration

from megatron_internvl.models.registry import get_spec
from megatron_internvl.training.flops import (
    llm_forward_flops,
    projector_forward_flops,
    training_flops,
    vit_forward_flops,
)
from tests.hf_oracle import hf_internvl_config


@pytest.mark.parametrize("name", ["tiny_qwen_300m_style", "tiny_internlm_6b_style"])
def test_forward_flops_equal_flop_counter_on_transformers(name):
    spec = get_spec(name)
    config = hf_internvl_config(spec)
    config.vision_config._attn_implementation = "eager"  # explicit matmuls, full s^2
    config.text_config._attn_implementation = "eager"
    model = InternVLForConditionalGeneration(config).eval()
    tiles, length = 2, 40
    ids = torch.randint(0, spec.image_token_id, (1, length))
    ids[0, 3 : 3 + tiles * spec.tokens_per_tile] = spec.image_token_id
    size = spec.vision.image_size
    pixels = torch.randn(tiles, 3, size, size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=ids, pixel_values=pixels)
    ours = (
        vit_forward_flops(spec, tiles)
        + projector_forward_flops(spec, tiles)
        + llm_forward_flops(spec, [length])
    )
    assert ours == counter.get_total_flops()


def test_training_flops_by_stage_and_packing():
    spec = get_spec("internvl2_5_8b")
    vit, proj = vit_forward_flops(spec, 4), projector_forward_flops(spec, 4)
    llm = llm_forward_flops(spec, [6000, 4000])
    assert training_flops(spec, [6000, 4000], 4) == 3 * (vit + proj + llm)
    assert training_flops(spec, [6000, 4000], 4, stage="1") == vit + 3 * proj + 2 * llm
    # Packing two samples attends within each: less attention than one 10k-token sample.
    assert llm < llm_forward_flops(spec, [10000])
    # A 448px tile through InternViT-300M: 2 x 0.3B params x 1025 tokens (0.62 TFLOP) plus
    # attention 4 x 1025^2 x 1024 x 24 layers (0.10 TFLOP).
    assert 0.70e12 < vit_forward_flops(spec, 1) < 0.75e12
