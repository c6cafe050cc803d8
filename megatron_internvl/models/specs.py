"""ModuleSpecs: the backend (local or Transformer Engine) is chosen here, never by the model.

A `Backend` names the layer specs a model is built from. The local backend runs anywhere (CPU
tests, and as the GPU reference); the TE backend uses Transformer Engine's fused layers and
attention (needed for FP8, THD packing and CP on GPUs). Both produce the same checkpoint keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_internvl.models.local_layers import LocalCoreAttention, LocalNorm


def without_bias(linear: type) -> type:
    """`linear` with its bias forced off: Megatron ties the QKV bias to add_bias_linear, but
    InternViT-6B has biases on every linear except QKV."""

    class NoBias(linear):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["bias"] = False
            super().__init__(*args, **kwargs)

    NoBias.__name__ = NoBias.__qualname__ = f"{linear.__name__}WithoutBias"
    return NoBias


def local_layer_spec(
    attn_mask_type: AttnMaskType = AttnMaskType.causal,
    qk_layernorm: bool = False,
    qkv_bias: bool = True,
) -> ModuleSpec:
    """A pre-norm transformer layer from Megatron-Core's own parallel linears and our local layers.

    Norms and attention come from `local_layers` so that sequence parallelism, packed rows and
    context parallelism work without Transformer Engine.
    """
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LocalNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear
                    if qkv_bias
                    else without_bias(ColumnParallelLinear),
                    core_attention=LocalCoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=LocalNorm if qk_layernorm else IdentityOp,
                    k_layernorm=LocalNorm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=LocalNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                ),
            ),
            mlp_bda=get_bias_dropout_add,
            # Same checkpoint keys as the TE spec (norms fused into the following linear there).
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def te_layer_spec(
    attn_mask_type: AttnMaskType = AttnMaskType.causal, qkv_bias: bool = True
) -> ModuleSpec:
    """The same layer from Transformer Engine modules (norms fused into the next linear)."""
    _require_te()
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    qkv = TELayerNormColumnParallelLinear
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv if qkv_bias else without_bias(qkv),
                    core_attention=TEDotProductAttention,
                    linear_proj=TERowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _require_te() -> None:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError) as error:
        raise ImportError(
            "backend 'te' needs Transformer Engine, which installs only on CUDA machines: "
            "pip install -e .[gpu] there, or use backend='local'"
        ) from error


def _te_norm() -> type:
    _require_te()
    from megatron.core.extensions.transformer_engine import TENorm

    return TENorm


@dataclass(frozen=True)
class Backend:
    """Where a model's layers come from."""

    name: str
    """"local" or "te"."""
    layer: Callable[..., ModuleSpec]
    """layer(attn_mask_type, qkv_bias=...) -> a transformer layer spec."""
    final_norm: Callable[[], type]
    """The norm class after the last layer."""
    supports_fp8: bool
    """Whether FP8 recipes can run on it."""


BACKENDS: dict[str, Backend] = {
    "local": Backend("local", local_layer_spec, lambda: LocalNorm, supports_fp8=False),
    "te": Backend("te", te_layer_spec, _te_norm, supports_fp8=True),
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; use one of {sorted(BACKENDS)}")
    return BACKENDS[name]


def block_spec(
    config: TransformerConfig,
    layer_spec: ModuleSpec,
    vp_stage: int | None = None,
    final_norm: type = LocalNorm,
) -> TransformerBlockSubmodules:
    """The layers this pipeline stage (and virtual stage) builds, plus the final norm."""
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * layers, layer_norm=final_norm)
