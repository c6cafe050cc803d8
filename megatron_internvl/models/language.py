"""Language models as Megatron-Core GPT models, one chunk per (virtual) pipeline stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_internvl.models.specs import block_spec, local_layer_spec
from megatron_internvl.parallel.layout import ParallelLayout


@dataclass(frozen=True)
class LanguageConfig:
    """Shape of a decoder-only LLM of the Qwen2.5 / InternLM2.5 kind.

    Both families are pre-norm RMSNorm, SwiGLU MLP without biases, rotary embeddings and
    grouped-query attention; they differ in QKV bias, norm epsilon and RoPE base.
    """

    num_layers: int
    """Transformer layers."""
    hidden_size: int
    """Model width."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (GQA groups)."""
    ffn_hidden_size: int
    """SwiGLU intermediate width."""
    vocab_size: int
    """The vocabulary: len(tokenizer) after InternVL added its tokens (unpadded)."""
    kv_channels: int | None = None
    """Head dim; None means hidden_size // num_attention_heads."""
    qkv_bias: bool = True
    """Bias on the fused QKV projection (Qwen2.5: yes, InternLM2.5: no)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 1e6
    """RoPE base frequency."""
    vocab_multiple: int = 128
    """The embedding and output layers hold the vocabulary padded to a multiple of this
    (Megatron's make_vocab_size_divisible_by): an odd vocabulary such as InternLM2.5's 92,553
    makes the output-layer GEMMs fall back to slow unaligned kernels, and TP needs a divisible
    one. Padded logits are masked, so the loss is exactly the unpadded vocabulary's."""

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output layers."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def transformer_config(self, layout: ParallelLayout, **overrides: Any) -> TransformerConfig:
        """Megatron's TransformerConfig for this shape under `layout` (dropout off, fp32)."""
        settings: dict[str, Any] = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels or self.hidden_size // self.num_attention_heads,
            ffn_hidden_size=self.ffn_hidden_size,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tensor_model_parallel_size=layout.tensor,
            pipeline_model_parallel_size=layout.pipeline,
            virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
            context_parallel_size=layout.context,
            sequence_parallel=layout.sequence_parallel,
            pipeline_dtype=torch.float32,
            calculate_per_token_loss=True,
            use_cpu_initialization=True,
        )
        settings.update(overrides)
        return TransformerConfig(**settings)


class SupervisedLogitsGPTModel(GPTModel):
    """Megatron's GPTModel that, given a `loss_mask`, runs the output layer and cross-entropy on
    the tokens that carry loss only.

    The output layer is most of a small LLM's FLOPs (vocabulary 151,674 x hidden 896 in
    InternVL 2.5 1B), and image, prompt and padding tokens carry no loss. Their per-token loss
    is exactly 0 here; the full path computes it and the loss mask multiplies it by 0, so the
    loss and every gradient are the same (the weight gradient sums fewer zero rows: fp32
    rounding only). Without a loss mask, under sequence parallelism (hidden states split along
    the sequence), multi-token prediction or inference, Megatron's own path runs.
    """

    def _postprocess(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        labels, loss_mask = kwargs.get("labels"), kwargs.get("loss_mask")
        plain = self.post_process and not (
            self.mtp_process
            or self.config.mtp_num_layers is not None
            or kwargs.get("inference_context") is not None
            or self.output_layer.sequence_parallel
            or self.share_embeddings_and_output_weights
        )
        if labels is None or loss_mask is None or not plain:
            return super()._postprocess(hidden_states, **kwargs)
        keep_sb = loss_mask.transpose(0, 1) != 0  # hidden states are [s, b, h]
        if not keep_sb.any():
            return super()._postprocess(hidden_states, **kwargs)
        logits, _ = self.output_layer(
            hidden_states[keep_sb].unsqueeze(1),
            runtime_gather_output=kwargs.get("runtime_gather_output"),
        )
        # compute_language_model_loss takes [b, s] labels and [s, b, vocab] logits.
        kept_labels = labels.transpose(0, 1)[keep_sb].unsqueeze(0)
        kept_loss = self.compute_language_model_loss(kept_labels, logits).reshape(-1)
        loss_sb = kept_loss.new_zeros(keep_sb.shape).index_put((keep_sb,), kept_loss)
        return loss_sb.transpose(0, 1).contiguous()


def build_gpt_chunks(
    config: TransformerConfig,
    language: LanguageConfig,
    max_sequence_length: int,
    layer_spec: ModuleSpec | None = None,
) -> list[GPTModel]:
    """The GPT model chunks this rank holds (one, or one per virtual pipeline stage).

    Embeddings are untied (InternVL's LLMs all have a separate output layer).
    """
    layer_spec = layer_spec or local_layer_spec()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunks.append(
            SupervisedLogitsGPTModel(
                config=config,
                transformer_layer_spec=block_spec(config, layer_spec, vp_stage=stage),
                vocab_size=language.vocab_size,
                max_sequence_length=max_sequence_length,
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=False, vp_stage=stage
                ),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=False, vp_stage=stage
                ),
                share_embeddings_and_output_weights=False,
                position_embedding_type="rope",
                rotary_base=language.rope_theta,
                vp_stage=stage,
            )
        )
    return chunks
