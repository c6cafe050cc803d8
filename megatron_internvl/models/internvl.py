"""InternVLModel: ViT -> pixel shuffle -> projector -> image tokens placed into the LLM's input.

The ViT and projector live on the first pipeline stage only. The first stage embeds the whole
row, writes the projected image tokens over the `<IMG_CONTEXT>` embeddings in order (row-major
over [batch, sequence], as InternVL does), then hands this rank's context-parallel share
(load-balanced, per sub-sample for packed rows), scattered for sequence parallelism, to the LLM.
With a vision TP below TP, the ViT replicas of one TP group each encode a share of the tiles
(parallel/vision_groups.py).
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_internvl.config.precision import PrecisionConfig
from megatron_internvl.models.language import SupervisedLogitsGPTModel
from megatron_internvl.models.registry import InternVLSpec
from megatron_internvl.models.specs import BACKENDS, Backend, block_spec, get_backend
from megatron_internvl.models.vision import (
    InternViT,
    VisionProjector,
    pixel_shuffle,
    projector_config,
    vision_transformer_config,
)
from megatron_internvl.parallel import vision_groups
from megatron_internvl.parallel.context_parallel import context_share
from megatron_internvl.parallel.layout import ParallelLayout


class InternVLModel(MegatronModule):
    """One pipeline chunk of InternVL (the first chunk also holds the ViT and projector)."""

    def __init__(
        self,
        spec: InternVLSpec,
        language_config: TransformerConfig,
        vision_config: TransformerConfig | None,
        projector_cfg: TransformerConfig | None,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
        backend: Backend = BACKENDS["local"],
    ) -> None:
        super().__init__(config=language_config)
        self.spec = spec
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = False
        self.model_type = ModelType.encoder_or_decoder
        self.has_vision = pre_process and vision_config is not None
        if self.has_vision:
            self.vision_model = InternViT(vision_config, spec.vision, backend)
            self.vision_projection = VisionProjector(
                projector_cfg, input_size=spec.projector_input_size
            )
            vision_groups.mark_replicated([self.vision_model, self.vision_projection])
        self.language_model = SupervisedLogitsGPTModel(
            config=language_config,
            transformer_layer_spec=block_spec(
                language_config, backend.layer(), vp_stage, backend.final_norm()
            ),
            vocab_size=spec.language.padded_vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_base=spec.language.rope_theta,
            scatter_embedding_sequence_parallel=False,  # we scatter after placing images
            vp_stage=vp_stage,
        )
        if post_process and spec.language.padded_vocab_size > spec.language.vocab_size:
            self.language_model.output_layer.register_forward_hook(self._mask_vocab_padding)

    def _mask_vocab_padding(self, _module: Any, _args: Any, output: Any) -> Any:
        """Padded vocabulary columns get the lowest logit: no probability in the loss's softmax
        (which so equals the unpadded model's), no gradient, never an argmax. In place, since a
        copy of the logits is the largest activation of the step."""
        logits, bias = output
        rank = parallel_state.get_tensor_model_parallel_rank()
        first_padded = self.spec.language.vocab_size - rank * logits.size(-1)  # in this shard
        if first_padded < logits.size(-1):
            logits[..., max(first_padded, 0) :].fill_(torch.finfo(logits.dtype).min)
        return logits, bias

    def set_input_tensor(self, input_tensor: Any) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def image_tokens(self, images_nchw: torch.Tensor) -> torch.Tensor:
        """Tiles [n, 3, S, S] -> projected image tokens [n * tokens_per_tile, hidden].

        This ViT replica encodes its share of the tiles; the shares are gathered in tile order.
        """
        features_ntc = self.vision_model(vision_groups.tile_share(images_nchw))
        grid = int(features_ntc.size(1) ** 0.5)
        shuffled = pixel_shuffle(
            features_ntc.reshape(features_ntc.size(0), grid, grid, -1), self.spec.downsample_ratio
        )
        tokens = self.vision_projection(shuffled.flatten(0, 2))
        return vision_groups.gather_tiles(tokens, images_nchw.size(0))

    def _place_images(
        self,
        embeds_sbh: torch.Tensor,
        input_ids: torch.Tensor,
        images_nchw: torch.Tensor | None,
        sample_keys: list[str] | None,
    ) -> torch.Tensor:
        slots_bs = input_ids == self.spec.image_token_id
        if images_nchw is None or images_nchw.size(0) == 0:
            if slots_bs.any():
                raise ValueError(self._mismatch(slots_bs, 0, sample_keys))
            # Text-only batch: a dummy tile keeps ViT/projector in the graph with zero gradient.
            size = self.spec.vision.image_size
            dummy = embeds_sbh.new_zeros(1, 3, size, size)
            return embeds_sbh + 0.0 * self.image_tokens(dummy).sum()
        tokens = self.image_tokens(images_nchw)
        if int(slots_bs.sum()) != tokens.size(0):
            raise ValueError(self._mismatch(slots_bs, tokens.size(0), sample_keys))
        embeds_bsh = embeds_sbh.transpose(0, 1)
        embeds_bsh = embeds_bsh.masked_scatter(slots_bs.unsqueeze(-1), tokens.to(embeds_bsh.dtype))
        return embeds_bsh.transpose(0, 1).contiguous()

    def _mismatch(self, slots_bs: torch.Tensor, n_tokens: int, keys: list[str] | None) -> str:
        per_row = slots_bs.sum(dim=1).tolist()
        tiles = n_tokens // self.spec.tokens_per_tile
        where = f" (samples {keys})" if keys else ""
        return (
            f"image/token mismatch{where}: rows hold {per_row} <IMG_CONTEXT> tokens "
            f"(total {sum(per_row)}) but {tiles} tiles give {n_tokens} image tokens "
            f"({self.spec.tokens_per_tile} per tile); each <image> must expand to "
            f"{self.spec.tokens_per_tile} x its tile count"
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        sample_keys: list[str] | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full rows in ([b, s] ids, positions, labels and loss mask); per-token loss of this CP
        share out (with a loss mask, computed only where it is nonzero: 0 elsewhere)."""
        share = context_share(
            input_ids.size(1),
            parallel_state.get_context_parallel_world_size(),
            parallel_state.get_context_parallel_rank(),
            packed_seq_params,
        )
        local = share.local

        decoder_input = None
        if self.pre_process:
            embeds_sbh = self.language_model.embedding(input_ids=input_ids, position_ids=None)
            if self.has_vision:
                embeds_sbh = self._place_images(embeds_sbh, input_ids, images, sample_keys)
            decoder_input = local(embeds_sbh, 0)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        return self.language_model(
            input_ids=None,
            position_ids=local(position_ids, 1),
            attention_mask=None,
            decoder_input=decoder_input,
            labels=None if labels is None else local(labels, 1),
            packed_seq_params=packed_seq_params,
            loss_mask=None if loss_mask is None else local(loss_mask, 1),
        )


VISION_RECOMPUTE = {
    "recompute_granularity": "full",
    "recompute_method": "uniform",
    "recompute_num_layers": 1,
}
"""ViT config fields of full recomputation, layer by layer."""


def build_internvl_chunks(
    spec: InternVLSpec,
    layout: ParallelLayout,
    max_sequence_length: int,
    first_stage_layers: int | None = None,
    vision_pad_heads_to: int | None = None,
    backend: str = "local",
    precision: PrecisionConfig | None = None,
    with_vision: bool = True,
    vision_recompute: bool = False,
    **language_overrides: Any,
) -> list[InternVLModel]:
    """This rank's InternVL chunks.

    `first_stage_layers` gives pipeline stage 0 fewer LLM layers, since it also runs the ViT;
    `vision_pad_heads_to` is the ViT's head-padding multiple (see vision_transformer_config);
    `backend` is "local" or "te" (Transformer Engine, needed for FP8); `with_vision=False`
    builds the language model alone (text-only training, LLM benchmarks);
    `vision_recompute` recomputes the ViT's layers in the backward pass (one at a time: only
    each layer's input is kept for the tiles).
    """
    chosen = get_backend(backend)
    precision = precision or PrecisionConfig()
    if precision.fp8_recipe and not chosen.supports_fp8:
        raise ValueError(
            f"FP8 recipe {precision.fp8_recipe!r} needs the Transformer Engine backend; "
            f"set backend='te' (installed with the gpu extra) or fp8_recipe=None"
        )
    numerics = precision.transformer_overrides()
    overrides = {**numerics, **language_overrides}
    if first_stage_layers is not None and layout.pipeline > 1:
        overrides["num_layers_in_first_pipeline_stage"] = first_stage_layers
    language_config = spec.language.transformer_config(layout, **overrides)
    # Settings every sub-model must share (e.g. meta-device builds skip initialization).
    shared = {k: v for k, v in language_overrides.items() if k in ("perform_initialization",)}
    vision_only = dict(VISION_RECOMPUTE) if vision_recompute else {}
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        vision = first and with_vision
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        chunks.append(
            InternVLModel(
                spec,
                language_config,
                (
                    vision_transformer_config(
                        spec.vision,
                        layout,
                        vision_pad_heads_to,
                        **numerics,
                        **shared,
                        **vision_only,
                    )
                    if vision
                    else None
                ),
                (
                    projector_config(spec.language.hidden_size, layout, **numerics, **shared)
                    if vision
                    else None
                ),
                max_sequence_length,
                pre_process=first,
                post_process=last,
                vp_stage=stage,
                backend=chosen,
            )
        )
    for chunk in chunks:
        _to_current_device(chunk)
        if chunk.has_vision:
            vision_groups.sync_replicas([chunk.vision_model, chunk.vision_projection])
    return chunks


def _to_current_device(chunk: torch.nn.Module) -> None:
    """Megatron allocates its layers on the current device; our own small modules (patch
    embedding, norms, layer scales) start on the CPU. Meta-device builds (parameter counts of
    huge flavours) stay where they are."""
    if not any(p.is_meta for p in chunk.parameters()):
        chunk.to(torch.cuda.current_device())
