"""Copy weights between our TP=1 ViT/projector and transformers' InternVL modules (test oracle)."""

from __future__ import annotations

import torch


def _fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """[Q; K; V] (each heads*d rows) -> Megatron's per-head [q_h; k_h; v_h] blocks."""
    return torch.cat([t.reshape(heads, -1, *t.shape[1:]) for t in (q, k, v)], dim=1).flatten(0, 1)


@torch.no_grad()
def load_hf_vision_into_ours(ours, hf_vision, padded_heads: int | None = None) -> None:
    """transformers InternVLVisionModel -> our InternViT (dummy padded heads stay zero)."""
    real = hf_vision.config.num_attention_heads
    heads = padded_heads or real
    ours.embeddings.class_embedding.copy_(hf_vision.embeddings.cls_token)
    ours.embeddings.position_embedding.copy_(hf_vision.embeddings.position_embeddings)
    ours.embeddings.patch_embedding.weight.copy_(
        hf_vision.embeddings.patch_embeddings.projection.weight
    )
    ours.embeddings.patch_embedding.bias.copy_(
        hf_vision.embeddings.patch_embeddings.projection.bias
    )
    for layer, hf in zip(ours.encoder.layers, hf_vision.encoder.layer, strict=True):
        attn, hf_attn = layer.self_attention, hf.attention

        def pad(t: torch.Tensor) -> torch.Tensor:
            rows = t.shape[0] // real
            return torch.cat([t, t.new_zeros(rows * (heads - real), *t.shape[1:])])

        q, k, v = (pad(getattr(hf_attn, f"{n}_proj").weight) for n in "qkv")
        attn.linear_qkv.weight.copy_(_fused_qkv(q, k, v, heads))
        if attn.linear_qkv.bias is not None:
            qb, kb, vb = (pad(getattr(hf_attn, f"{n}_proj").bias) for n in "qkv")
            attn.linear_qkv.bias.copy_(_fused_qkv(qb, kb, vb, heads))
        proj = hf_attn.projection_layer.weight
        attn.linear_proj.weight.copy_(
            torch.cat(
                [
                    proj,
                    proj.new_zeros(proj.shape[0], attn.linear_proj.weight.shape[1] - proj.shape[1]),
                ],
                dim=1,
            )
        )
        attn.linear_proj.bias.copy_(hf_attn.projection_layer.bias)
        if hf.attention.q_norm.__class__.__name__ != "Identity":
            attn.q_layernorm.weight.copy_(pad(hf_attn.q_norm.weight))
            attn.k_layernorm.weight.copy_(pad(hf_attn.k_norm.weight))
        layer.self_attn_bda.layer_scale.copy_(hf.lambda_1)
        layer.mlp_bda.layer_scale.copy_(hf.lambda_2)
        layer.mlp.linear_fc1.weight.copy_(hf.mlp.fc1.weight)
        layer.mlp.linear_fc1.bias.copy_(hf.mlp.fc1.bias)
        layer.mlp.linear_fc2.weight.copy_(hf.mlp.fc2.weight)
        layer.mlp.linear_fc2.bias.copy_(hf.mlp.fc2.bias)
        for ours_norm, hf_norm in (
            (layer.input_layernorm, hf.layernorm_before),
            (layer.pre_mlp_layernorm, hf.layernorm_after),
        ):
            ours_norm.weight.copy_(hf_norm.weight)
            if ours_norm.bias is not None:
                ours_norm.bias.copy_(hf_norm.bias)


@torch.no_grad()
def load_hf_projector_into_ours(ours, hf_projector) -> None:
    ours.norm.weight.copy_(hf_projector.layer_norm.weight)
    ours.norm.bias.copy_(hf_projector.layer_norm.bias)
    ours.mlp.linear_fc1.weight.copy_(hf_projector.linear_1.weight)
    ours.mlp.linear_fc1.bias.copy_(hf_projector.linear_1.bias)
    ours.mlp.linear_fc2.weight.copy_(hf_projector.linear_2.weight)
    ours.mlp.linear_fc2.bias.copy_(hf_projector.linear_2.bias)
