"""Named tensor transforms between HF weights and Megatron-Core parameters (TP=1, full tensors).

Each transform is a pair of pure functions: `to_megatron(ctx, *hf_tensors) -> tensor` and its
inverse `to_hf(ctx, megatron_tensor) -> tuple of hf tensors`. The mapping tables in
`hf_mappings` name a transform per row; nothing else in the converter reshapes tensors.

Both directions only reshape, slice, concatenate and pad, so they also run on meta tensors: the
converter applies `to_hf` to a meta tensor of a Megatron parameter's shape to learn which HF
shapes to expect, without touching any data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_internvl.models.registry import InternVLSpec

INTERNVL_ADDED_TOKENS = 9
"""`<img> </img> <IMG_CONTEXT> <quad> </quad> <ref> </ref> <box> </box>`, added by InternVL."""


@dataclass(frozen=True)
class ShapeContext:
    """The head counts and sizes the transforms need, from a spec and the built model."""

    vit_heads: int
    """Real InternViT heads (25 for 6B)."""
    vit_padded_heads: int
    """Heads in the Megatron ViT, dummies included (a multiple of the TP it was built for)."""
    vit_head_dim: int
    llm_heads: int
    llm_groups: int
    """KV heads (GQA groups)."""
    llm_head_dim: int
    vocab: int
    """Unpadded vocabulary (len(tokenizer) after InternVL added its tokens)."""
    padded_vocab: int
    """Rows of the Megatron embedding and output layers (see LanguageConfig.vocab_multiple)."""

    @classmethod
    def of(cls, spec: InternVLSpec, vit_padded_heads: int | None = None) -> ShapeContext:
        lang = spec.language
        return cls(
            vit_heads=spec.vision.num_attention_heads,
            vit_padded_heads=vit_padded_heads or spec.vision.num_attention_heads,
            vit_head_dim=spec.vision.head_dim,
            llm_heads=lang.num_attention_heads,
            llm_groups=lang.num_query_groups,
            llm_head_dim=lang.kv_channels or lang.hidden_size // lang.num_attention_heads,
            vocab=lang.vocab_size,
            padded_vocab=lang.padded_vocab_size,
        )

    @property
    def vit_dummy_heads(self) -> int:
        return self.vit_padded_heads - self.vit_heads


ToMegatron = Callable[..., torch.Tensor]
ToHF = Callable[[ShapeContext, torch.Tensor], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Transform:
    """A named, invertible tensor transform (see the module docstring)."""

    name: str
    doc: str
    to_megatron: ToMegatron
    to_hf: ToHF
    min_rows: Callable[[ShapeContext], int] | None = None
    """If set, HF tensors may have more rows than `to_hf` gives (at least this many): an LLM
    checkpoint whose vocabulary is padded beyond its tokenizer."""


# --- InternViT: [Q_all; K_all; V_all] (HF) <-> per head [q_h; k_h; v_h] (Megatron) -----------


def _pad_heads(t: torch.Tensor, ctx: ShapeContext, fill: float = 0.0) -> torch.Tensor:
    """Append the dummy heads' rows (zeros: they output nothing and get no gradient)."""
    rows = ctx.vit_dummy_heads * ctx.vit_head_dim
    return torch.cat([t, t.new_full((rows, *t.shape[1:]), fill)]) if rows else t


def _vit_interleave(ctx: ShapeContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    heads, d = ctx.vit_padded_heads, ctx.vit_head_dim
    blocks = [_pad_heads(t, ctx).reshape(heads, d, *t.shape[1:]) for t in (q, k, v)]
    return torch.stack(blocks, dim=1).reshape(3 * heads * d, *q.shape[1:])


def _vit_deinterleave(ctx: ShapeContext, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    real, d = ctx.vit_heads, ctx.vit_head_dim
    per_head = w.reshape(ctx.vit_padded_heads, 3, d, *w.shape[1:])[:real]  # drop dummy heads
    return tuple(per_head[:, j].reshape(real * d, *w.shape[1:]) for j in range(3))


VIT_QKV_FUSED = Transform(
    "vit_qkv_fused",
    "original InternViT `attn.qkv` [Q; K; V] -> Megatron per-head [q_h; k_h; v_h], dummy heads 0",
    lambda ctx, qkv: _vit_interleave(ctx, *qkv.chunk(3)),
    lambda ctx, w: (torch.cat(_vit_deinterleave(ctx, w)),),
)
VIT_QKV_SPLIT = Transform(
    "vit_qkv_split",
    "transformers' q_proj, k_proj, v_proj -> Megatron per-head [q_h; k_h; v_h], dummy heads 0",
    _vit_interleave,
    _vit_deinterleave,
)
VIT_PROJ_COLUMNS = Transform(
    "vit_proj_columns",
    "attention output projection: zero input columns for the dummy heads",
    lambda ctx, w: _pad_heads(w.t(), ctx).t(),
    lambda ctx, w: (w[:, : ctx.vit_heads * ctx.vit_head_dim],),
)
VIT_QK_NORM = Transform(
    "vit_qk_norm",
    "full-width QK-norm weight: ones for the dummy heads' channels (their q/k are 0 anyway)",
    lambda ctx, w: _pad_heads(w, ctx, fill=1.0),
    lambda ctx, w: (w[: ctx.vit_heads * ctx.vit_head_dim],),
)

# --- LLM attention: Megatron groups rows per KV head: [q of the group's heads; k_g; v_g] ------


def _gqa_group(ctx: ShapeContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    g, d = ctx.llm_groups, ctx.llm_head_dim
    per_group = ctx.llm_heads // g
    rest = q.shape[1:]
    blocks = [q.reshape(g, per_group * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)]
    return torch.cat(blocks, dim=1).reshape(-1, *rest)


def _gqa_ungroup(ctx: ShapeContext, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    g, d = ctx.llm_groups, ctx.llm_head_dim
    per_group = ctx.llm_heads // g
    rest = w.shape[1:]
    q, k, v = w.reshape(g, (per_group + 2) * d, *rest).split([per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


GQA_QKV = Transform(
    "gqa_qkv",
    "Qwen2 / Llama q_proj, k_proj, v_proj (weight or bias) -> Megatron's KV-grouped linear_qkv",
    _gqa_group,
    _gqa_ungroup,
)
KV_GROUPED_QKV = Transform(
    "kv_grouped_qkv",
    "InternLM2 `wqkv` is already grouped per KV head exactly like Megatron's linear_qkv: a copy",
    lambda ctx, w: w,
    lambda ctx, w: (w,),
)

# --- MLP and vocabulary ------------------------------------------------------------------------

SWIGLU_FC1 = Transform(
    "swiglu_fc1",
    "gate (Qwen2 gate_proj / InternLM2 w1) and up (up_proj / w3) -> linear_fc1 = [gate; up]",
    lambda ctx, gate, up: torch.cat([gate, up]),
    lambda ctx, w: tuple(w.chunk(2)),
)


def _pad_vocab(ctx: ShapeContext, w: torch.Tensor) -> torch.Tensor:
    # Zero rows up to the padded size: the model masks their logits, nothing reads them.
    missing = ctx.padded_vocab - w.size(0)
    return torch.cat([w, w.new_zeros(missing, *w.shape[1:])]) if missing > 0 else w


VOCAB_ROWS = Transform(
    "vocab_rows",
    "embedding / output rows: HF holds the unpadded vocabulary; Megatron pads it with zero rows "
    "to a multiple of vocab_multiple, which export drops",
    _pad_vocab,
    lambda ctx, w: (w[: ctx.vocab],),
)


def _extend_vocab(ctx: ShapeContext, w: torch.Tensor) -> torch.Tensor:
    # InternVL's stage-1 recipe: the 9 new rows start as the mean of the LLM's tokenizer rows
    # (rows past len(tokenizer) are padding the LLM never trained, so they are dropped).
    old = ctx.vocab - INTERNVL_ADDED_TOKENS
    mean = w[:old].float().mean(dim=0, keepdim=True).to(w.dtype)
    return torch.cat([w[:old], mean.expand(INTERNVL_ADDED_TOKENS, -1)])


VOCAB_EXTEND = Transform(
    "vocab_extend",
    "stage-1 import from a bare LLM: keep its tokenizer's rows, add InternVL's 9 tokens as "
    "mean rows",
    lambda ctx, w: _pad_vocab(ctx, _extend_vocab(ctx, w)),
    lambda ctx, w: (w[: ctx.vocab - INTERNVL_ADDED_TOKENS],),
    min_rows=lambda ctx: ctx.vocab - INTERNVL_ADDED_TOKENS,
)

IDENTITY = Transform("identity", "same tensor, same shape", lambda ctx, w: w, lambda ctx, w: (w,))

TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        IDENTITY,
        VIT_QKV_FUSED,
        VIT_QKV_SPLIT,
        VIT_PROJ_COLUMNS,
        VIT_QK_NORM,
        GQA_QKV,
        KV_GROUPED_QKV,
        SWIGLU_FC1,
        VOCAB_ROWS,
        VOCAB_EXTEND,
    )
}
"""Every transform by the name the mapping tables use."""
