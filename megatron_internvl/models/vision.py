"""InternViT on Megatron-Core transformer layers, pixel shuffle and the MLP projector.

InternViT differs from a plain pre-norm ViT block in three ways, each handled here without
forking Megatron's TransformerLayer:
- layer scale (ls1/ls2) and drop path on both residual branches: `ScaledResidual` replaces the
  layer's bias-dropout-add;
- the 6B variant's QK-norm is one RMSNorm over all heads (3200 channels), not per head:
  `FullWidthQKNorm` reduces its statistics over the tensor-parallel group and counts only real
  heads;
- 25 heads do not divide TP=2/4/8: heads are padded to a multiple of the vision TP size with
  dummy heads whose weights are zero, so they produce zero output and receive zero gradients
  (`zero_dummy_heads`).
The ViT and projector run on the vision tensor-parallel group (`parallel.vision_tensor`, see
parallel/vision_groups.py), which is the LLM's TP group unless the layout says otherwise.
The 1025-token sequence (class token + 32x32 patches) is padded for sequence parallelism (and
FP8 alignment) with the padded keys masked out.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_internvl.models.local_layers import LocalNorm
from megatron_internvl.models.specs import BACKENDS, Backend
from megatron_internvl.models.vision_config import VisionConfig
from megatron_internvl.parallel import vision_groups
from megatron_internvl.parallel.collectives import all_reduce_sum
from megatron_internvl.parallel.layout import ParallelLayout


def padded_heads(real_heads: int, multiple: int) -> int:
    """Heads rounded up to a multiple of the tensor-parallel size."""
    return math.ceil(real_heads / multiple) * multiple


def vision_transformer_config(
    vision: VisionConfig,
    layout: ParallelLayout,
    pad_heads_to: int | None = None,
    **overrides: Any,
) -> TransformerConfig:
    """Megatron config of the ViT under `layout`: vision TP, and SP when the layout has it and
    the vision TP is above 1 (the ViT is never pipelined or CP).

    Heads are padded to a multiple of `pad_heads_to` (default: the vision TP size). The padded
    count is part of the checkpoint's shapes, so runs that reshard a padded ViT across TP sizes
    should pick a multiple that covers all of them (8 covers TP 1-8: 25 -> 32 heads).
    """
    tp = layout.vision_tensor_size
    multiple = pad_heads_to or tp
    if multiple % tp:
        raise ValueError(
            f"vision heads padded to a multiple of {multiple} cannot be split over "
            f"vision tensor_parallel={tp}; use a multiple of {tp}"
        )
    heads = padded_heads(vision.num_attention_heads, multiple)
    settings: dict[str, Any] = dict(
        num_layers=vision.num_layers,
        hidden_size=vision.hidden_size,
        num_attention_heads=heads,
        num_query_groups=heads,
        kv_channels=vision.head_dim,  # explicit: 6B has 25 heads of 128
        ffn_hidden_size=vision.ffn_hidden_size,
        normalization=vision.norm,
        layernorm_epsilon=vision.norm_eps,
        add_bias_linear=True,
        add_qkv_bias=vision.qkv_bias,
        gated_linear_unit=False,
        activation_func=F.gelu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        sequence_parallel=layout.sequence_parallel and tp > 1,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


class ScaledResidual(torch.nn.Module):
    """residual + drop_path(layer_scale * (x + bias)): InternViT's residual branch.

    Called like Megatron's bias-dropout-add: `module(training, fused)(x_with_bias, residual, p)`.
    """

    def __init__(self, config: TransformerConfig, init: float, drop_path: float) -> None:
        super().__init__()
        self.layer_scale = torch.nn.Parameter(
            torch.full((config.hidden_size,), init, dtype=config.params_dtype)
        )
        # Replicated over TP but sees only this rank's tokens under SP: grads need the TP sum.
        self.layer_scale.sequence_parallel = config.sequence_parallel
        self.drop_path = drop_path

    def forward(self, training: bool, fused: bool):
        def apply(x_with_bias, residual: torch.Tensor, prob: float) -> torch.Tensor:
            x, bias = x_with_bias
            if bias is not None:
                x = x + bias
            x = x * self.layer_scale
            if training and self.drop_path > 0:
                keep = 1.0 - self.drop_path
                # One draw per sample ([s, b, h] layout), identical on all TP ranks.
                mask = torch.empty(1, x.size(1), 1, device=x.device).bernoulli_(keep)
                x = x * mask / keep
            return residual + x

        return apply


class FullWidthQKNorm(torch.nn.Module):
    """RMSNorm over all heads' channels of q (or k), with heads sharded over TP.

    Statistics are a TP all-reduce of local sums of squares divided by the real channel count,
    so dummy (padded) heads, which are exactly zero, do not dilute them.
    """

    def __init__(
        self, config: TransformerConfig, hidden_size: int, eps: float, real_heads: int
    ) -> None:
        super().__init__()
        tp = config.tensor_model_parallel_size
        self.local_width = config.num_attention_heads // tp * config.kv_channels
        self.real_width = real_heads * config.kv_channels
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.local_width, dtype=config.params_dtype))
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1

    def forward(self, x_sbhd: torch.Tensor) -> torch.Tensor:
        flat = x_sbhd.float().flatten(-2)
        sum_sq = flat.pow(2).sum(-1, keepdim=True)
        sum_sq = all_reduce_sum(sum_sq, vision_groups.tensor_group())
        normed = flat * torch.rsqrt(sum_sq / self.real_width + self.eps) * self.weight
        return normed.to(x_sbhd.dtype).view_as(x_sbhd)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        metadata = vision_groups.checkpoint_metadata(metadata)
        return make_sharded_tensors_for_checkpoint(
            state,
            prefix,
            {"weight": 0},
            sharded_offsets,
            tp_group=vision_groups.tensor_group(),
            dp_cp_group=metadata["dp_cp_group"],
        )


class InternViTLayer(TransformerLayer):
    """Megatron's TransformerLayer with InternViT's layer-scaled, drop-path residuals."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Any,
        layer_number: int = 1,
        layer_scale_init: float = 0.1,
        drop_path_rates: tuple[float, ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        rate = drop_path_rates[self.layer_number - 1] if drop_path_rates else 0.0
        self.self_attn_bda = ScaledResidual(config, layer_scale_init, rate)
        self.mlp_bda = ScaledResidual(config, layer_scale_init, rate)


def internvit_layer_spec(vision: VisionConfig, backend: Backend) -> ModuleSpec:
    """Bidirectional layer (padded keys masked) with InternViT's residuals and (6B) full-width
    QK-norm, from `backend`'s modules."""
    spec = backend.layer(AttnMaskType.padding, qkv_bias=vision.qkv_bias)
    steps = max(vision.num_layers - 1, 1)
    rates = [vision.drop_path_rate * i / steps for i in range(vision.num_layers)]  # linspace
    spec.module = InternViTLayer
    spec.params = {
        "layer_scale_init": vision.layer_scale_init,
        "drop_path_rates": tuple(rates),
    }
    attention = spec.submodules.self_attention.submodules
    if vision.qk_norm:
        qk_norm = ModuleSpec(
            module=FullWidthQKNorm, params={"real_heads": vision.num_attention_heads}
        )
        attention.q_layernorm = qk_norm
        attention.k_layernorm = qk_norm
    return spec


class InternViTEmbeddings(torch.nn.Module):
    """Patch conv + class token + learned position embedding (bicubically resized if needed)."""

    def __init__(self, vision: VisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        width = vision.hidden_size
        self.grid = vision.image_size // vision.patch_size
        self.class_embedding = torch.nn.Parameter(torch.randn(1, 1, width, dtype=dtype))
        self.patch_embedding = torch.nn.Conv2d(
            3, width, vision.patch_size, vision.patch_size, dtype=dtype
        )
        self.position_embedding = torch.nn.Parameter(
            torch.randn(1, 1 + self.grid**2, width, dtype=dtype)
        )

    def _positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        cls_pos, patch_pos = self.position_embedding[:, :1], self.position_embedding[:, 1:]
        if (grid_h, grid_w) != (self.grid, self.grid):
            grid = patch_pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(
                grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False
            )
            patch_pos = grid.to(patch_pos.dtype).flatten(2).transpose(1, 2)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, pixels_nchw: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels_nchw.to(self.patch_embedding.weight.dtype))
        grid_h, grid_w = patches.shape[-2:]
        tokens_ntc = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(tokens_ntc.size(0), -1, -1)
        return torch.cat([cls, tokens_ntc], dim=1) + self._positions(grid_h, grid_w)


class InternViT(MegatronModule):
    """Images [n, 3, H, W] -> last-layer patch features [n, patches, C] (class token dropped)."""

    def __init__(
        self, config: TransformerConfig, vision: VisionConfig, backend: Backend = BACKENDS["local"]
    ) -> None:
        super().__init__(config=config)
        self.vision = vision
        self.tp_group = vision_groups.tensor_group()
        self.embeddings = InternViTEmbeddings(vision, config.params_dtype)
        self.encoder = TransformerBlock(
            config,
            internvit_layer_spec(vision, backend),
            pre_process=True,
            post_process=False,
            pg_collection=vision_groups.process_groups(),
        )
        # 1025 tokens: pad for SP (divisible by TP) and FP8 GEMMs (multiples of 16).
        tp = config.tensor_model_parallel_size if config.sequence_parallel else 1
        self.seq_pad_multiple = math.lcm(16 if config.fp8 else 1, tp)
        zero_dummy_heads(self, vision.num_attention_heads)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Shards named by the vision-TP rank; every other holder of a shard is a replica."""
        metadata = vision_groups.checkpoint_metadata(metadata)
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)

    def forward(self, pixels_nchw: torch.Tensor) -> torch.Tensor:
        tokens_ntc = self.embeddings(pixels_nchw)
        n, length, _ = tokens_ntc.shape
        padded = math.ceil(length / self.seq_pad_multiple) * self.seq_pad_multiple
        if padded != length:
            tokens_ntc = F.pad(tokens_ntc, (0, 0, 0, padded - length))
        # Always a mask (TE's padding attention requires one, even when nothing is padded).
        pad_keys = torch.zeros(n, 1, 1, padded, dtype=torch.bool, device=tokens_ntc.device)
        pad_keys[..., length:] = True  # Megatron masks: True = masked out
        hidden_snc = tokens_ntc.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            hidden_snc = tensor_parallel.scatter_to_sequence_parallel_region(
                hidden_snc, group=self.tp_group
            )
        hidden_snc = self.encoder(hidden_snc, attention_mask=pad_keys)
        if self.config.sequence_parallel:
            hidden_snc = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_snc, tensor_parallel_output_grad=False, group=self.tp_group
            )
        return hidden_snc[1:length].transpose(0, 1)


def zero_dummy_heads(vit: InternViT, real_heads: int) -> None:
    """Zero the weights of padded heads so they output zeros and get zero gradients."""
    config = vit.config
    tp = config.tensor_model_parallel_size
    local_heads = config.num_attention_heads // tp
    first = vision_groups.tensor_group().rank() * local_heads
    dummies = [h for h in range(local_heads) if first + h >= real_heads]
    if not dummies:
        return
    head_dim = config.kv_channels
    with torch.no_grad():
        for layer in vit.encoder.layers:
            attention = layer.self_attention
            for h in dummies:
                # Megatron's fused QKV: per head (group) [q, k, v] blocks of head_dim rows.
                rows = slice(h * 3 * head_dim, (h + 1) * 3 * head_dim)
                attention.linear_qkv.weight[rows] = 0
                if attention.linear_qkv.bias is not None:
                    attention.linear_qkv.bias[rows] = 0
                attention.linear_proj.weight[:, h * head_dim : (h + 1) * head_dim] = 0


def pixel_shuffle(features_nhwc: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """InternVL's pixel shuffle v2: [n, h, w, c] -> [n, h*s, w*s, c/s^2] (s = 0.5 halves h, w)."""
    n, h, w, c = features_nhwc.shape
    x = features_nhwc.reshape(n, h, int(w * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(n, int(w * scale), int(h * scale), int(c / scale**2))
    return x.permute(0, 2, 1, 3).contiguous()


def projector_config(
    language_hidden: int, layout: ParallelLayout, **overrides: Any
) -> TransformerConfig:
    """Megatron config of the projector MLP (4*Cv -> Cl -> Cl, GELU, biases), vision TP only."""
    settings: dict[str, Any] = dict(
        num_layers=1,
        hidden_size=language_hidden,
        ffn_hidden_size=language_hidden,
        num_attention_heads=layout.vision_tensor_size,
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=F.gelu,
        normalization="LayerNorm",
        layernorm_epsilon=1e-5,
        tensor_model_parallel_size=layout.vision_tensor_size,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


class VisionProjector(MegatronModule):
    """mlp1: LayerNorm(4*Cv) -> Linear(4*Cv, Cl) -> GELU -> Linear(Cl, Cl), column/row parallel."""

    def __init__(self, config: TransformerConfig, input_size: int) -> None:
        super().__init__(config=config)
        self.tp_group = vision_groups.tensor_group()
        self.norm = LocalNorm(config, input_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(
            config,
            MLPSubmodules(
                linear_fc1=tensor_parallel.ColumnParallelLinear,
                linear_fc2=tensor_parallel.RowParallelLinear,
            ),
            input_size=input_size,
            tp_group=self.tp_group,
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Shards named by the vision-TP rank; every other holder of a shard is a replica."""
        metadata = vision_groups.checkpoint_metadata(metadata)
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)

    def forward(self, shuffled_td: torch.Tensor) -> torch.Tensor:
        out, bias = self.mlp(self.norm(shuffled_td))
        return out if bias is None else out + bias
