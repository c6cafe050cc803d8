"""Layers of the local (non-Transformer-Engine) backend that Megatron-Core's own lack.

- `LocalNorm`: LayerNorm or RMSNorm that works under sequence parallelism. Megatron's torch
  norm refuses SP; SP only needs the norm's weights marked `sequence_parallel` so that
  `finalize_model_grads` all-reduces their gradients across the tensor-parallel group.
- `LocalCoreAttention`: softmax attention with masks built from *global* token positions, so
  one implementation covers causal and bidirectional attention, packed rows (block-diagonal by
  `cu_seqlens`) and context parallelism over Megatron's load-balanced split (keys and values
  all-gathered over the CP group). It is the plain reference that the TE path is checked against.

Both run on any device; the local spec uses them on CPU and as a GPU reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_internvl.parallel.collectives import all_gather_dim0
from megatron_internvl.parallel.context_parallel import context_share


class LocalNorm(torch.nn.Module):
    """`config.normalization` ("LayerNorm" or "RMSNorm") over the last dim, SP-aware."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        if config.layernorm_zero_centered_gamma:
            raise ValueError("LocalNorm does not implement layernorm_zero_centered_gamma")
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = (
            None
            if self.rms
            else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        )
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = (hidden.size(-1),)
        if self.rms:
            return F.rms_norm(hidden, shape, self.weight, self.eps)
        return F.layer_norm(hidden, shape, self.weight, self.bias, self.eps)


def _segment_ids(positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(positions, cu_seqlens[1:], right=True)


class LocalCoreAttention(MegatronModule):
    """Drop-in for Megatron's DotProductAttention with packing and context parallelism.

    Inputs follow Megatron's core-attention contract: query [sq, b, heads, d] and key/value
    [sk, b, groups, d] (or [t, heads, d] for packed THD), returning [sq, b, heads*d]
    ([t, heads*d] for THD). `packed_seq_params.cu_seqlens_q` are boundaries in the global
    (pre-CP-split) row.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.apply_query_key_layer_scaling:
            raise ValueError("LocalCoreAttention does not implement query-key layer scaling")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        # A model whose config has no CP (the ViT) never splits, even inside a CP run.
        self.cp_group = pg_collection.cp if config.context_parallel_size > 1 else None
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(head_dim)
        self.dropout = torch.nn.Dropout(
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def _positions(
        self, local_len: int, packed_seq_params: PackedSeqParams | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cp_size, cp_rank = (self.cp_group.size(), self.cp_group.rank()) if self.cp_group else (1, 0)
        share = context_share(local_len * cp_size, cp_size, cp_rank, packed_seq_params)
        return share.indices, share.all_indices, torch.tensor(share.boundaries)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("LocalCoreAttention does not take an attention bias")
        thd = query.dim() == 3
        if thd:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        sq, batch, heads, head_dim = query.shape
        if self.cp_group is not None:
            key = all_gather_dim0(key, self.cp_group)
            value = all_gather_dim0(value, self.cp_group)

        q_pos, k_pos, cu_seqlens = self._positions(sq, packed_seq_params)
        q_pos, k_pos = q_pos.to(query.device), k_pos.to(query.device)
        cu_seqlens = cu_seqlens.to(query.device)
        allowed_qk = _segment_ids(q_pos, cu_seqlens)[:, None] == _segment_ids(k_pos, cu_seqlens)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if mask_type == AttnMaskType.causal:
            allowed_qk &= k_pos[None, :] <= q_pos[:, None]
        blocked = ~allowed_qk[None, None]  # [1, 1, sq, sk]
        if attention_mask is not None:  # Megatron convention: True = masked out
            blocked = blocked | attention_mask

        groups = key.size(2)
        if heads != groups:
            key = key.repeat_interleave(heads // groups, dim=2)
            value = value.repeat_interleave(heads // groups, dim=2)
        scores = torch.einsum("sbhd,tbhd->bhst", query, key) * self.softmax_scale
        scores = scores.float().masked_fill(blocked, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(query.dtype)
        if self.training and self.dropout.p > 0:
            # Heads are TP-sharded: draw from the model-parallel stream unless SP (as Megatron).
            if self.config.sequence_parallel:
                probs = self.dropout(probs)
            else:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    probs = self.dropout(probs)
        context = torch.einsum("bhst,tbhd->sbhd", probs, value)
        context = context.reshape(sq, batch, heads * head_dim)
        return context.squeeze(1) if thd else context
