"""Per-GPU memory and step time of one InternVL layout: the planner's cost model.

Memory, per pipeline stage (the largest decides): bf16 parameters, fp32 gradient buffer
(training/step.py reduces in fp32), the distributed optimizer's fp32 master + two Adam moments
over its shard (element counts from planner/params.py, exact against real ranks), activations,
and a fixed reserve (CUDA context, NCCL buffers, allocator fragmentation).

Activations (bf16, flash attention so no s^2 term, sequence parallel so everything / TP), bytes
per token per layer: LLM 8h + 2(q + 2kv) + 2q + 6f (norm inputs, QKV, attention output, SwiGLU
gate/up/product); with full recomputation only the layer input 2h is kept, plus one layer's full
working set. ViT 12c + 12w + 4f (w: padded attention width; QK-norm inputs, layer-scale inputs,
GELU in/out) over tiles x (patches + 1) tokens. The ViT is recomputed only with
model.recompute=full+vit ("full" recomputes the LLM's layers only).
Under 1F1B stage s keeps (pipeline - s) micro-batches in flight. The last stage adds the fp32
logits of the vocab-parallel loss. NOT yet checked against a GPU: benchmarks/plan_memory_gpu.py.

Step time = (micro-batches + pipeline - 1) x the slowest stage's micro-batch time + the
data-parallel gradient reduce-scatter and parameter all-gather (not overlapped: step.py wraps
DDP with overlap_grad_reduce=False). A stage's micro-batch time: its model FLOPs
(training/flops.py; +1 forward of the LLM with full recomputation; the ViT's padded heads
counted) at the stated achievable rate, plus its TP collectives (with SP, per layer 2
all-gathers + 2 reduce-scatters forward, as many backward, again when recomputing) and the
context-parallel KV ring, both counted as exposed, plus the pipeline send/receive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from megatron_internvl.models.registry import InternVLSpec
from megatron_internvl.models.vision import padded_heads
from megatron_internvl.planner.params import Param, RankShare, rank_share, stage_layers
from megatron_internvl.training.flops import (
    _STAGE_FACTORS,
    llm_forward_flops,
    projector_forward_flops,
    training_flops,
    vit_forward_flops,
)

GB = 2**30


@dataclass(frozen=True)
class Hardware:
    """The machine the plan is for; every rate is a stated assumption, not a measurement."""

    gpu_memory_gb: float = 80.0
    """Memory per GPU."""
    achievable_tflops: float = 400.0
    """Dense bf16 matmul rate a real step sustains per GPU (H100 SXM peak 989; ~40%)."""
    nvlink_gb_s: float = 300.0
    """Achieved collective bus bandwidth inside a node (NVLink 4: 450 GB/s per direction)."""
    network_gb_s: float = 40.0
    """Achieved bandwidth per GPU between nodes (one 400 Gb/s NIC per GPU)."""
    gpus_per_node: int = 8
    """GPUs joined by NVLink; TP stays inside a node."""
    reserved_gb: float = 4.0
    """CUDA context, NCCL buffers and allocator fragmentation, per GPU."""


@dataclass(frozen=True)
class Workload:
    """What a step processes."""

    gpus: int
    global_batch: int
    """Packed rows per optimizer step."""
    seq_length: int
    """Tokens per packed row."""
    max_tiles_per_row: int
    """Tiles the loader allows per row: the memory peak."""
    mean_tiles_per_row: float
    """Tiles of an average row: the step time."""
    mean_sample_length: int
    """Tokens of an average sub-sample (attention's len^2 is per sub-sample)."""
    training_stage: str = "2"


@dataclass(frozen=True)
class Layout:
    tensor: int
    vision_tensor: int
    pipeline: int
    first_stage_layers: int | None
    context: int
    recompute: str
    """"none", "full" (LLM layers: model.recompute=full) or "full+vit" (LLM and ViT layers)."""
    micro_batch: int

    @property
    def model_parallel(self) -> int:
        return self.tensor * self.pipeline * self.context

    def without_first_stage(self) -> Layout:
        """This layout with stage 0's layer count left open (layouts that differ only there)."""
        return replace(self, first_stage_layers=None)


@dataclass(frozen=True)
class Prediction:
    memory_gb: list[float]
    """Per pipeline stage."""
    memory_parts_gb: dict[str, float]
    """Of the largest stage: weights, grads, optimizer, activations, reserved."""
    step_s: float
    parts_s: dict[str, float]
    """compute, tp_comm, cp_comm, pp_comm (per step, slowest stage), bubble, dp_comm."""
    model_tflops_per_gpu: float


def _llm_token_bytes(spec: InternVLSpec) -> int:
    lang = spec.language
    h, f = lang.hidden_size, lang.ffn_hidden_size
    head = lang.kv_channels or h // lang.num_attention_heads
    q, kv = lang.num_attention_heads * head, lang.num_query_groups * head
    return 8 * h + 2 * (q + 2 * kv) + 2 * q + 6 * f


def _vit_token_bytes(spec: InternVLSpec, vision_tensor: int) -> int:
    vit = spec.vision
    w = padded_heads(vit.num_attention_heads, vision_tensor) * vit.head_dim
    return 12 * vit.hidden_size + 12 * w + 4 * vit.ffn_hidden_size


def activation_bytes(
    spec: InternVLSpec, layout: Layout, work: Workload, stage: int, layers: int
) -> float:
    """Activation bytes of pipeline `stage` (holding `layers` LLM layers) at its peak."""
    tp, cp, pp = layout.tensor, layout.context, layout.pipeline
    tokens = work.seq_length * layout.micro_batch / cp
    in_flight = pp - stage
    per_layer = tokens * _llm_token_bytes(spec) / tp
    if layout.recompute == "none":
        llm = per_layer * layers * in_flight
    else:
        llm = tokens * 2 * spec.language.hidden_size / tp * layers * in_flight + per_layer
    total = llm
    if stage == 0:
        vit = spec.vision
        tiles = work.max_tiles_per_row * layout.micro_batch
        vit_tokens = tiles * (vit.num_patches + 1) / tp  # vision-TP groups split the tiles
        per_vit_layer = vit_tokens * _vit_token_bytes(spec, layout.vision_tensor)
        if layout.recompute == "full+vit":
            kept = vit_tokens * 2 * vit.hidden_size * vit.num_layers + per_vit_layer
        else:
            kept = per_vit_layer * vit.num_layers
        total += kept * in_flight
    if stage == pp - 1:
        total += tokens * spec.language.padded_vocab_size / tp * (2 + 4)
    return total


_SHARES: dict[tuple, RankShare] = {}


def _share(table: tuple[Param, ...], layout: Layout, stage: int, dp_cp: int, training: str):
    """rank_share of data-parallel rank 0, memoised (the search asks for the same ones often;
    `table` stays alive in param_table's cache, so its id is a key)."""
    key = (
        id(table),
        layout.tensor,
        layout.vision_tensor,
        layout.pipeline,
        stage,
        layout.first_stage_layers,
        dp_cp,
        training,
    )
    if key not in _SHARES:
        _SHARES[key] = rank_share(
            table,
            tensor=layout.tensor,
            vision_tensor=layout.vision_tensor,
            pipeline=layout.pipeline,
            stage=stage,
            first_stage_layers=layout.first_stage_layers,
            data_parallel=dp_cp,
            training_stage=training,
        )
    return _SHARES[key]


def predict(
    spec: InternVLSpec, table: tuple[Param, ...], layout: Layout, work: Workload, hw: Hardware
) -> Prediction:
    """Memory of every stage and the step time of `layout` (the ViT's heads padded in `table`
    as `layout.vision_tensor` pads them)."""
    dp = work.gpus // layout.model_parallel
    layers = stage_layers(spec.language.num_layers, layout.pipeline, layout.first_stage_layers)
    memory, parts = [], {}
    for stage in range(layout.pipeline):
        share = _share(table, layout, stage, dp * layout.context, work.training_stage)
        stage_parts = {
            "weights": (share.grad_buffer + share.params - share.trained_params) * 2 / GB,
            "grads": share.grad_buffer * 4 / GB,
            "optimizer": share.grad_buffer // (dp * layout.context) * 12 / GB,
            "activations": activation_bytes(spec, layout, work, stage, layers[stage]) / GB,
            "reserved": hw.reserved_gb,
        }
        memory.append(sum(stage_parts.values()))
        if memory[-1] == max(memory):
            parts = stage_parts
    step_s, time_parts, flops = _step_time(spec, table, layout, work, hw, layers, dp)
    return Prediction(memory, parts, step_s, time_parts, flops / step_s / work.gpus / 1e12)


def _vision_flops(spec: InternVLSpec, layout: Layout, work: Workload) -> float:
    """Hardware FLOPs of the ViT + projector per micro-batch, all ranks together (padded
    heads included: the attention part of every ViT layer grows with the padded width)."""
    vit = spec.vision
    vit_factor, projector_factor, _ = _STAGE_FACTORS[work.training_stage]
    vit_factor += 1 if layout.recompute == "full+vit" else 0
    tiles = work.mean_tiles_per_row * layout.micro_batch
    tokens = vit.num_patches + 1
    per_head = 2 * tokens * 4 * vit.hidden_size * vit.head_dim + 4 * tokens**2 * vit.head_dim
    padding = padded_heads(vit.num_attention_heads, layout.vision_tensor) - vit.num_attention_heads
    forward = vit_forward_flops(spec, 1) * tiles + tiles * vit.num_layers * per_head * padding
    return vit_factor * forward + projector_factor * projector_forward_flops(spec, tiles)


def _stage_seconds(
    spec: InternVLSpec, layout: Layout, work: Workload, hw: Hardware, layers: list[int]
) -> list[dict[str, float]]:
    """Per pipeline stage, one micro-batch's compute, TP, CP and PP communication seconds."""
    tp, cp, pp, vt = layout.tensor, layout.context, layout.pipeline, layout.vision_tensor
    lang, vit = spec.language, spec.vision
    rows, rate = layout.micro_batch, hw.achievable_tflops * 1e12
    llm_factor = _STAGE_FACTORS[work.training_stage][2]
    recompute = 1 if layout.recompute != "none" else 0
    lengths = [work.mean_sample_length] * max(1, work.seq_length // work.mean_sample_length)
    output = 2 * work.seq_length * lang.hidden_size * lang.vocab_size * rows
    layer_flops = (llm_forward_flops(spec, lengths) * rows - output) / lang.num_layers
    layer_flops *= (llm_factor + recompute) / (tp * cp)

    def bandwidth(group: int) -> float:
        return (hw.nvlink_gb_s if group <= hw.gpus_per_node else hw.network_gb_s) * 1e9

    # With SP: 2 all-gathers + 2 reduce-scatters of one activation per layer and pass.
    act = work.seq_length * rows / cp * lang.hidden_size * 2
    layer_tp = 4 * (2 + recompute) * act * (tp - 1) / tp / bandwidth(tp)
    tiles = work.mean_tiles_per_row * rows
    vit_act = tiles * (vit.num_patches + 1) * vit.hidden_size * 2 * vt / tp  # a group's share
    vision_tp = vit.num_layers * 8 * vit_act * (vt - 1) / vt / bandwidth(vt)
    groups = tp // vt  # vision-TP groups gather their image tokens (and scatter the grads)
    embeds = tiles * spec.tokens_per_tile * lang.hidden_size * 2
    vision_tp += 2 * embeds * (groups - 1) / groups / bandwidth(tp)
    head = lang.kv_channels or lang.hidden_size // lang.num_attention_heads
    kv = work.seq_length * rows / cp * 2 * lang.num_query_groups * head / tp * 2
    layer_cp = 3 * kv * (cp - 1) / bandwidth(tp * cp)  # KV ring: forward, backward (2x)
    pp_send = 2 * act / tp / bandwidth(tp * cp * pp) if pp > 1 else 0.0
    stages = []
    for stage, count in enumerate(layers):
        compute, comm_tp = count * layer_flops / rate, count * layer_tp
        if stage == 0:
            compute += _vision_flops(spec, layout, work) / tp / rate
            comm_tp += vision_tp
        if stage == pp - 1:
            compute += llm_factor * output / (tp * cp) / rate
        stages.append(
            {
                "compute": compute,
                "tp_comm": comm_tp,
                "cp_comm": count * layer_cp,
                "pp_comm": pp_send,
            }
        )
    return stages


def _step_time(
    spec: InternVLSpec,
    table: tuple[Param, ...],
    layout: Layout,
    work: Workload,
    hw: Hardware,
    layers: list[int],
    dp: int,
) -> tuple[float, dict[str, float], float]:
    """(step seconds, its parts, the step's model FLOPs)."""
    pp, dp_cp = layout.pipeline, dp * layout.context
    stages = _stage_seconds(spec, layout, work, hw, layers)
    slowest = max(stages, key=lambda parts: sum(parts.values()))
    micro = work.global_batch // (dp * layout.micro_batch)
    largest = max(
        _share(table, layout, s, dp_cp, work.training_stage).grad_buffer for s in range(pp)
    )
    in_node = layout.model_parallel * dp <= hw.gpus_per_node
    dp_bw = (hw.nvlink_gb_s if in_node else hw.network_gb_s) * 1e9
    # Distributed optimizer: reduce-scatter fp32 grads, all-gather bf16 params.
    dp_comm = largest * (4 + 2) * (dp_cp - 1) / dp_cp / dp_bw
    parts = {name: micro * seconds for name, seconds in slowest.items()}
    parts["bubble"] = (pp - 1) * sum(slowest.values())
    parts["dp_comm"] = dp_comm
    lengths = [work.mean_sample_length] * max(1, work.seq_length // work.mean_sample_length)
    tiles = math.floor(work.mean_tiles_per_row)
    model_flops = work.global_batch * training_flops(spec, lengths, tiles, work.training_stage)
    return sum(parts.values()), parts, model_flops
