"""What one rank holds of a flavour's parameters, gradient buffers and optimizer state.

Shapes come from the real Megatron model built on the meta device at TP=1 (as models/info.py
counts parameters), with the ViT's heads padded as the layout pads them; which tensors TP splits
is Megatron's rule for its layers (column/row-parallel linears, vocab-parallel embeddings; the
ViT's full-width QK norms are split like its heads); norms, biases of row-parallel linears, layer
scales and the patch/position embeddings are replicated. Pipeline stages take layers as
`num_layers_in_first_pipeline_stage` does, the ViT and embedding on stage 0, the final norm and
output layer on the last. The gradient buffer and the distributed optimizer's shards follow
Megatron-Core's `_ParamAndGradBuffer` layout (one bucket, `overlap_grad_reduce=False` as
training/step.py wraps it): parameters in reverse order, starts aligned to 64 elements and the
end padded to lcm(data-parallel size, 128) with the distributed optimizer. Checked element for
element against real ranks in tests/test_planner.py.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch

from megatron_internvl.models.registry import InternVLSpec

# Parameter-name endings that tensor parallelism splits (the rest is replicated).
_TP_SPLIT = re.compile(
    r"(linear_qkv\.(weight|bias)|linear_fc1\.(weight|bias)|linear_proj\.weight|"
    r"linear_fc2\.weight|word_embeddings\.weight|output_layer\.weight|"
    r"q_layernorm\.weight|k_layernorm\.weight)$"
)
_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")
# Stage -> parts that train (training/freezing.py's stages).
_TRAINED = {
    "1": ("projector",),
    "1.5": ("vision", "projector"),
    "2": ("vision", "projector", "language"),
}
_PARTS = {"vision_model": "vision", "vision_projection": "projector", "language_model": "language"}


@dataclass(frozen=True)
class Param:
    """One parameter of the TP=1 model."""

    name: str
    numel: int
    part: str
    """"vision", "projector" or "language"."""
    tp_split: bool
    """Split over the tensor-parallel group (of the ViT's TP for the ViT and projector)."""
    layer: int | None
    """Global LLM layer index, None outside the decoder's layers."""


@functools.lru_cache(maxsize=16)
def param_table(spec: InternVLSpec, vision_pad_heads_to: int) -> tuple[Param, ...]:
    """Every parameter of `spec` in Megatron's order, ViT heads padded to a multiple of
    `vision_pad_heads_to`; vocabulary padded as training pads it. Builds on the meta device
    (needs Megatron's process groups: `parallel.runtime.single_process()`)."""
    from megatron_internvl.models.internvl import build_internvl_chunks
    from megatron_internvl.parallel.layout import ParallelLayout

    with torch.device("meta"):
        [model] = build_internvl_chunks(
            spec,
            ParallelLayout(),
            4096,
            vision_pad_heads_to=vision_pad_heads_to,
            perform_initialization=False,
        )
    table = []
    for name, param in model.named_parameters():
        match = _LAYER.match(name)
        table.append(
            Param(
                name=name,
                numel=param.numel(),
                part=_PARTS[name.split(".", 1)[0]],
                tp_split=bool(_TP_SPLIT.search(name)),
                layer=int(match.group(1)) if match else None,
            )
        )
    return tuple(table)


def stage_layers(num_layers: int, pipeline: int, first_stage_layers: int | None) -> list[int]:
    """LLM layers per pipeline stage, as Megatron assigns them."""
    if pipeline == 1:
        return [num_layers]
    if first_stage_layers is None:
        return [num_layers // pipeline] * pipeline
    rest = (num_layers - first_stage_layers) // (pipeline - 1)
    return [first_stage_layers] + [rest] * (pipeline - 1)


def _on_stage(param: Param, stage: int, bounds: list[int], pipeline: int) -> bool:
    if param.part != "language" or param.name.startswith("language_model.embedding."):
        return stage == 0
    if param.layer is not None:
        return bounds[stage] <= param.layer < bounds[stage + 1]
    return stage == pipeline - 1  # final norm, output layer


@dataclass(frozen=True)
class RankShare:
    """Elements one rank holds (not bytes: the memory model prices them)."""

    params: int
    """Parameter elements of the rank's model (trained and frozen)."""
    trained_params: int
    """Of which trained (in the gradient buffer)."""
    grad_buffer: int
    """Elements of the DDP gradient buffer, padding included (also the size of the distributed
    optimizer's parameter buffer)."""
    optimizer_shard: int
    """Trained elements whose optimizer state this rank keeps (each Adam moment has this many;
    so has the fp32 master copy of bf16 parameters)."""


def rank_share(
    table: tuple[Param, ...],
    *,
    tensor: int,
    vision_tensor: int | None = None,
    pipeline: int = 1,
    stage: int = 0,
    first_stage_layers: int | None = None,
    data_parallel: int = 1,
    data_parallel_rank: int = 0,
    distributed_optimizer: bool = True,
    training_stage: str = "2",
) -> RankShare:
    """The share of pipeline `stage`, at data-parallel rank `data_parallel_rank` (the
    optimizer's shard group is data x context parallel, the group DDP reduces over)."""
    num_layers = 1 + max(p.layer for p in table if p.layer is not None)
    bounds = [0]
    for count in stage_layers(num_layers, pipeline, first_stage_layers):
        bounds.append(bounds[-1] + count)
    vision_tensor = vision_tensor or tensor
    sizes, trained = [], []
    for param in table:
        if not _on_stage(param, stage, bounds, pipeline):
            continue
        split = tensor if param.part == "language" else vision_tensor
        size = param.numel // split if param.tp_split else param.numel
        sizes.append(size)
        if param.part in _TRAINED[training_stage]:
            trained.append(size)
    buffer, ranges = _buffer_layout(trained, data_parallel, distributed_optimizer)
    if distributed_optimizer:
        shard = buffer // data_parallel
        lo, hi = data_parallel_rank * shard, (data_parallel_rank + 1) * shard
        owned = sum(max(0, min(end, hi) - max(start, lo)) for start, end in ranges)
    else:
        owned = sum(trained)
    return RankShare(sum(sizes), sum(trained), buffer, owned)


def _buffer_layout(
    sizes: list[int], data_parallel: int, distributed_optimizer: bool
) -> tuple[int, list[tuple[int, int]]]:
    """(buffer elements, [start, end) of each parameter) of one gradient buffer."""
    if not sizes:
        return 0, []
    align = 64 if distributed_optimizer else 1
    start, ranges = 0, []
    for size in reversed(sizes):
        start = math.ceil(start / align) * align
        ranges.append((start, start + size))
        start += size
    end = ranges[-1][1]
    if distributed_optimizer:
        multiple = math.lcm(data_parallel, 128)
        end = math.ceil(end / multiple) * multiple
    return end, ranges
