"""The local backend's norm and core attention equal torch's own implementations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_internvl.models.local_layers import LocalCoreAttention, LocalNorm


@pytest.fixture(scope="module")
def world(single_rank):
    """A one-rank process group (TP and CP groups of size 1)."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _config(**overrides) -> TransformerConfig:
    base = dict(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=8,
        normalization="RMSNorm",
        attention_dropout=0.0,
    )
    return TransformerConfig(**{**base, **overrides})


def _attention(world, mask_type=AttnMaskType.causal) -> LocalCoreAttention:
    groups = ProcessGroupCollection(tp=world, cp=world)
    return LocalCoreAttention(_config(), 1, mask_type, "self", pg_collection=groups)


def _sdpa(q, k, v, **kwargs):
    """torch's attention on Megatron's [s, b, h, d] layout, GQA by repetition."""
    k = k.repeat_interleave(q.size(2) // k.size(2), dim=2)
    v = v.repeat_interleave(q.size(2) // v.size(2), dim=2)
    out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), **kwargs)
    return out.permute(2, 0, 1, 3).flatten(2)


def _qkv(seq: int, batch: int = 2):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(seq, batch, 4, 8, generator=gen)
    k = torch.randn(seq, batch, 2, 8, generator=gen)
    v = torch.randn(seq, batch, 2, 8, generator=gen)
    return q, k, v


def test_causal_gqa_attention_matches_torch_sdpa(world):
    q, k, v = _qkv(12)
    ours = _attention(world)(q, k, v, attention_mask=None)
    torch.testing.assert_close(ours, _sdpa(q, k, v, is_causal=True), atol=1e-6, rtol=1e-5)


def test_bidirectional_attention_with_padding_mask(world):
    q, k, v = _qkv(10)
    padded = torch.zeros(2, 1, 1, 10, dtype=torch.bool)
    padded[1, ..., 7:] = True  # sample 1 has 3 padding keys (Megatron: True = masked)
    ours = _attention(world, AttnMaskType.no_mask)(q, k, v, attention_mask=padded)
    expected = _sdpa(q, k, v, attn_mask=~padded)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def test_packed_rows_attend_only_within_each_sample(world):
    lengths = [5, 3, 8]
    q, k, v = (t[:, :1] for t in _qkv(sum(lengths)))  # one packed row
    cu_seqlens = torch.tensor([0, 5, 8, 16], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens)
    ours = _attention(world)(
        q.squeeze(1), k.squeeze(1), v.squeeze(1), None, packed_seq_params=params
    )
    pieces = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        pieces.append(_sdpa(q[start:end], k[start:end], v[start:end], is_causal=True))
    torch.testing.assert_close(ours, torch.cat(pieces).squeeze(1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_local_norm_matches_torch(normalization):
    config = _config(normalization=normalization, sequence_parallel=False)
    norm = LocalNorm(config, hidden_size=32, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 2, 32)
    if normalization == "RMSNorm":
        reference = torch.nn.RMSNorm(32, eps=1e-6)
    else:
        reference = torch.nn.LayerNorm(32, eps=1e-6)
        with torch.no_grad():
            norm.bias.uniform_(-0.5, 0.5)
            reference.bias.copy_(norm.bias)
    with torch.no_grad():
        reference.weight.copy_(norm.weight)
    torch.testing.assert_close(norm(x), reference(x))


def test_local_norm_marks_weights_for_sequence_parallel_grad_reduction():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = _config(
        normalization="LayerNorm", tensor_model_parallel_size=2, sequence_parallel=True
    )
    with pytest.raises(AssertionError, match="sequence parallel"):
        WrappedTorchNorm(config, hidden_size=32)  # why the local spec needs its own norm
    norm = LocalNorm(config, hidden_size=32)
    assert all(p.sequence_parallel for p in norm.parameters())


def test_megatron_local_attention_refuses_context_parallel(world):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    config = _config(context_parallel_size=2)
    groups = ProcessGroupCollection(tp=world, cp=world)
    with pytest.raises(AssertionError, match="Context parallelism"):
        DotProductAttention(config, 1, AttnMaskType.causal, "self", pg_collection=groups)


def _forward_and_grads(forward, q, k, v):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = forward(q, k, v)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize(
    "mask_type, cu_seqlens, padded_keys",
    [
        (AttnMaskType.causal, [0, 5, 8, 16], 0),  # packed row
        (AttnMaskType.padding, [0, 7, 16], 0),  # bidirectional, packed
        (AttnMaskType.causal, None, 0),
        (AttnMaskType.padding, None, 3),  # the ViT: padded keys masked
        # samples of 5 and 7 tokens padded to 8 (CP/FP8 packing): tokens lie at the padded
        # boundaries, cu_seqlens_q_padded
        (AttnMaskType.causal, ([0, 5, 12], [0, 8, 16]), 0),
    ],
)
def test_fused_attention_equals_the_masked_softmax(world, mask_type, cu_seqlens, padded_keys):
    """The fast path (torch's fused attention per sub-sequence, taken without CP or dropout)
    gives the masked-softmax path's outputs and gradients (the implementation before it, kept
    for CP), within fp32 tolerance (atol 1e-6, rtol 1e-5)."""
    attention = _attention(world, mask_type)
    q, k, v = _qkv(16, batch=1 if cu_seqlens else 2)
    kwargs = {}
    if cu_seqlens is not None:
        q, k, v = (t.squeeze(1) for t in (q, k, v))
        real, padded = cu_seqlens if isinstance(cu_seqlens, tuple) else (cu_seqlens, None)
        cu = torch.tensor(real, dtype=torch.int32)
        cu_padded = None if padded is None else torch.tensor(padded, dtype=torch.int32)
        kwargs["packed_seq_params"] = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            cu_seqlens_q_padded=cu_padded,
            cu_seqlens_kv_padded=cu_padded,
        )
    mask = None
    if padded_keys:
        mask = torch.zeros(2, 1, 1, 16, dtype=torch.bool)
        mask[1, ..., -padded_keys:] = True

    def masked(q, k, v):
        thd = q.dim() == 3
        if thd:
            q, k, v = (t.unsqueeze(1) for t in (q, k, v))
        out = attention._masked_attention(q, k, v, mask, mask_type, kwargs.get("packed_seq_params"))
        return out.flatten(2).squeeze(1) if thd else out.flatten(2)

    fused = _forward_and_grads(lambda q, k, v: attention(q, k, v, mask, **kwargs), q, k, v)
    for ours, reference in zip(fused, _forward_and_grads(masked, q, k, v), strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
