"""Language models as Megatron-Core GPT models, one chunk per (virtual) pipeline stage."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_internvl.models.specs import block_spec, local_layer_spec


def build_gpt_chunks(
    config: TransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    layer_spec: ModuleSpec | None = None,
    rotary_base: int = 10000,
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
            GPTModel(
                config=config,
                transformer_layer_spec=block_spec(config, layer_spec, vp_stage=stage),
                vocab_size=vocab_size,
                max_sequence_length=max_sequence_length,
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=False, vp_stage=stage
                ),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=False, vp_stage=stage
                ),
                share_embeddings_and_output_weights=False,
                position_embedding_type="rope",
                rotary_base=rotary_base,
                vp_stage=stage,
            )
        )
    return chunks
