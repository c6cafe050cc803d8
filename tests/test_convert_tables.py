"""The mapping tables name exactly our model's tensors and transformers' state-dict tensors, every
transform inverts exactly, and Megatron's QKV grouping is the one its attention splits."""

from __future__ import annotations

import pytest
import torch

from megatron_internvl.checkpoint.hf_config import native_config
from megatron_internvl.checkpoint.hf_mappings import expand, native_file_name, table_for
from megatron_internvl.checkpoint.hf_transforms import TRANSFORMS, ShapeContext
from megatron_internvl.models.internvl import build_internvl_chunks
from megatron_internvl.models.registry import get_spec
from megatron_internvl.parallel.layout import ParallelLayout
from tests.convert_cases import FLAVOURS, original_shapes
from tests.hf_oracle import build_hf_model


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tables_cover_our_model_and_transformers_exactly(single_rank, flavour):
    spec = get_spec(flavour)
    [model] = build_internvl_chunks(spec, ParallelLayout(), 16, vision_pad_heads_to=2)
    ours = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    hf_names = {k for k, _ in build_hf_model(spec).state_dict().items()}
    for layout, expected_hf in (("native", hf_names), ("original", set(original_shapes(spec)))):
        entries = expand(table_for(layout, spec.llm_family), spec)
        assert {e.megatron for e in entries} == ours
        assert len(entries) == len(ours)  # no Megatron tensor written twice
        assert [n for e in entries for n in e.hf] and {n for e in entries for n in e.hf} == (
            expected_hf
        )


def test_native_file_names_are_what_save_pretrained_writes():
    assert (
        native_file_name("model.language_model.norm.weight") == "language_model.model.norm.weight"
    )
    assert native_file_name("lm_head.weight") == "language_model.lm_head.weight"
    assert native_file_name("model.vision_tower.x") == "vision_tower.x"
    assert native_file_name("model.multi_modal_projector.x") == "multi_modal_projector.x"


# The published configs, written down from the model cards (not from our registry): the LLMs of
# InternVL2_5-1B (Qwen2.5-0.5B-Instruct, vocabulary extended by InternVL's tokens) and
# InternVL2_5-8B (InternLM2.5-7B-chat as transformers' Llama). Their ViT, InternViT-300M-448px,
# is transformers' documented InternVLVisionConfig default (with its q/k/v bias), as are the
# InternVLConfig fields
# (image_token_id aside, 92546 for InternLM2 tokenizers).
PUBLISHED_TEXT = {
    "internvl2_5_1b": lambda t: t.Qwen2Config(
        vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
    ),
    "internvl2_5_8b": lambda t: t.LlamaConfig(
        vocab_size=92553, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6},
        attention_bias=False, max_position_embeddings=32768, tie_word_embeddings=False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("flavour", sorted(PUBLISHED_TEXT))
def test_native_config_is_the_published_one(flavour):
    import transformers

    spec = get_spec(flavour)
    expected = transformers.InternVLConfig(
        # InternViT-300M-448px: transformers' defaults, and its qkv_bias (true in its config)
        vision_config=transformers.InternVLVisionConfig(attention_bias=True),
        text_config=PUBLISHED_TEXT[flavour](transformers),
        image_token_id=spec.image_token_id,
        tie_word_embeddings=False,
    ).to_dict()
    ours = native_config(spec, "float32").to_dict()
    assert ours.pop("architectures") == ["InternVLForConditionalGeneration"]
    expected.pop("architectures")
    for side in (ours, expected, ours["text_config"], expected["text_config"]):
        for key in ("dtype", "torch_dtype", "transformers_version"):
            side.pop(key, None)
    for side in (ours["vision_config"], expected["vision_config"]):
        for key in ("dtype", "torch_dtype", "transformers_version"):
            side.pop(key, None)
    assert ours["vision_config"] == expected["vision_config"]
    assert ours["text_config"] == expected["text_config"]
    assert ours == expected
    assert image_token_id_of(flavour) == spec.image_token_id


def image_token_id_of(flavour: str) -> int:
    """`<IMG_CONTEXT>`'s id in the released tokenizers (Qwen2.5: 151667, InternLM2.5: 92546)."""
    return {"internvl2_5_1b": 151667, "internvl2_5_8b": 92546}[flavour]


CTX = ShapeContext(
    vit_heads=5, vit_padded_heads=8, vit_head_dim=3, llm_heads=6, llm_groups=2,
    llm_head_dim=4, vocab=20, padded_vocab=32,
)  # fmt: skip
HF_SHAPES = {
    "identity": [(7, 5)],
    "vit_qkv_fused": [(45, 15)],
    "vit_qkv_split": [(15, 15)] * 3,
    "vit_proj_columns": [(15, 15)],
    "vit_qk_norm": [(15,)],
    "gqa_qkv": [(24, 10), (8, 10), (8, 10)],
    "kv_grouped_qkv": [(40, 10)],
    "swiglu_fc1": [(9, 10), (9, 10)],
    "vocab_rows": [(20, 10)],
}


@pytest.mark.parametrize("name", sorted(HF_SHAPES))
def test_transforms_invert_exactly(name):
    transform = TRANSFORMS[name]
    parts = [torch.randn(s) for s in HF_SHAPES[name]]
    megatron = transform.to_megatron(CTX, *parts)
    back = transform.to_hf(CTX, megatron)
    assert len(back) == len(parts) and all(
        torch.equal(a, b) for a, b in zip(back, parts, strict=True)
    )


def test_vocab_rows_are_padded_with_zero_rows_that_export_drops():
    rows = torch.randn(20, 10)
    padded = TRANSFORMS["vocab_rows"].to_megatron(CTX, rows)
    assert padded.shape == (32, 10) and torch.equal(padded[:20], rows) and not padded[20:].any()


def test_vit_dummy_heads_are_zero_with_unit_qk_norm():
    q, k, v = (torch.randn(15, 15) for _ in range(3))
    fused = TRANSFORMS["vit_qkv_split"].to_megatron(CTX, q, k, v).reshape(8, 3, 3, 15)
    assert torch.equal(fused[:, 0, :, :][:5].reshape(15, 15), q)  # head h: [q_h; k_h; v_h]
    assert torch.equal(fused[:, 1][:5].reshape(15, 15), k)
    assert not fused[5:].any()
    proj = TRANSFORMS["vit_proj_columns"].to_megatron(CTX, torch.randn(15, 15))
    assert proj.shape == (15, 24) and not proj[:, 15:].any()
    norm = TRANSFORMS["vit_qk_norm"].to_megatron(CTX, torch.randn(15))
    assert torch.equal(norm[15:], torch.ones(9))


def test_gqa_grouping_is_what_megatron_attention_splits(single_rank):
    # Megatron's SelfAttention.get_query_key_value_tensors views linear_qkv's output as
    # [groups, (heads_per_group + 2) * head_dim] and splits q / k / v inside each group.
    q = torch.arange(6 * 4).float().reshape(24, 1)
    k = 100 + torch.arange(2 * 4).float().reshape(8, 1)
    v = 200 + torch.arange(2 * 4).float().reshape(8, 1)
    grouped = TRANSFORMS["gqa_qkv"].to_megatron(CTX, q, k, v).reshape(2, 5, 4)
    assert torch.equal(grouped[0, :3].flatten(), q[:12, 0])  # group 0: heads 0-2
    assert torch.equal(grouped[0, 3], k[:4, 0]) and torch.equal(grouped[0, 4], v[:4, 0])
    assert torch.equal(grouped[1, :3].flatten(), q[12:, 0])
