"""Checks that a run can work, before anything is allocated; every error says what to change."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megatron_internvl.config.schema import RunConfig
from megatron_internvl.models.registry import InternVLSpec
from megatron_internvl.parallel.layout import ParallelLayout


class RecipeError(ValueError):
    """A run configuration that cannot work; the message says what to change."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_of(cfg: RunConfig) -> ParallelLayout:
    p = cfg.parallel
    try:
        return ParallelLayout(
            p.tensor,
            p.pipeline,
            p.virtual_pipeline,
            p.context,
            p.sequence_parallel,
            vision_tensor=p.vision_tensor,
        )
    except ValueError as error:
        raise RecipeError(f"recipe {cfg.name}: {error}") from None


def validate(cfg: RunConfig, spec: InternVLSpec, world_size: int) -> ParallelLayout:
    """Raise RecipeError if `cfg` cannot run on `world_size` ranks; return the layout."""
    where = f"recipe {cfg.name}"
    layout = layout_of(cfg)
    lang = spec.language
    errors: list[str] = []
    tp, pp = layout.tensor, layout.pipeline
    if lang.num_attention_heads % tp:
        valid = [d for d in _divisors(lang.num_attention_heads) if lang.num_query_groups % d == 0]
        errors.append(
            f"{lang.num_attention_heads} attention heads are not divisible by "
            f"tensor_parallel={tp}; use one of {valid}"
        )
    elif lang.num_query_groups % tp:
        errors.append(
            f"{lang.num_query_groups} key/value groups are not divisible by "
            f"tensor_parallel={tp}; use one of {_divisors(lang.num_query_groups)}"
        )
    if lang.padded_vocab_size % tp:
        errors.append(
            f"the padded vocabulary ({lang.vocab_size} -> {lang.padded_vocab_size} rows, a "
            f"multiple of vocab_multiple={lang.vocab_multiple}) is not divisible by "
            f"tensor_parallel={tp}; use a vocab_multiple that is a multiple of {tp}"
        )
    layers = cfg.model.num_layers or lang.num_layers
    first = cfg.parallel.first_stage_layers
    if pp > 1:
        rest = layers - (first if first is not None else 0)
        stages = pp - (1 if first is not None else 0)
        if first is not None and not 0 < first < layers:
            errors.append(f"first_stage_layers={first} must be between 1 and {layers - 1}")
        elif rest % stages:
            errors.append(
                f"{rest} LLM layers do not split over {stages} pipeline stages"
                + (f" after first_stage_layers={first}" if first is not None else "")
                + "; change pipeline or first_stage_layers"
            )
        elif layout.virtual_pipeline and (rest // stages) % layout.virtual_pipeline:
            errors.append(
                f"{rest // stages} layers per stage do not split into "
                f"virtual_pipeline={layout.virtual_pipeline} chunks"
            )
    if world_size % layout.model_parallel:
        errors.append(
            f"tensor x pipeline x context = {layout.model_parallel} does not divide "
            f"{world_size} GPUs; choose a product in {_divisors(world_size)}"
        )
    else:
        dp = world_size // layout.model_parallel
        per_step = cfg.train.micro_batch * dp
        if cfg.train.global_batch % per_step:
            errors.append(
                f"global_batch={cfg.train.global_batch} is not a multiple of "
                f"micro_batch x data_parallel = {cfg.train.micro_batch} x {dp}; use "
                f"a multiple of {per_step}"
            )
    errors += _sequence_errors(cfg, layout)
    if cfg.model.fp8_recipe and cfg.model.backend != "te":
        errors.append("FP8 needs the Transformer Engine backend: set model.backend=te")
    if cfg.model.fp8_recipe and cfg.model.dtype != "bfloat16":
        errors.append("FP8 needs model.dtype=bfloat16")
    if cfg.data.source == "shards" and not cfg.data.shards:
        errors.append("data.source=shards needs data.shards=[<shard dir or .tar>, ...]")
    if cfg.data.source == "shards" and not cfg.data.tokenizer:
        errors.append("data.source=shards needs data.tokenizer=<HF tokenizer directory>")
    if cfg.data.source == "shards":
        errors += _video_frames_errors(cfg)
    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_fraction * t.steps)
    if warmup >= t.steps:
        errors.append(
            f"the warm-up ({warmup} steps) must be shorter than train.steps={t.steps}; "
            "lower train.warmup_steps or raise train.steps"
        )
    if cfg.model.recompute not in (None, "selective", "full", "full+vit"):
        errors.append(
            f"model.recompute={cfg.model.recompute!r}; use null, 'selective', 'full' or 'full+vit'"
        )
    if cfg.train.stage not in ("1", "1.5", "2"):
        errors.append(f"train.stage={cfg.train.stage!r}; use '1', '1.5' or '2'")
    if cfg.train.nonfinite not in ("skip", "stop"):
        errors.append(f"train.nonfinite={cfg.train.nonfinite!r}; use 'skip' or 'stop'")
    errors += _validation_set_errors(cfg)
    if cfg.data.balance and cfg.data.source != "shards":
        errors.append(
            f"data.balance=true deals shard samples by cost; data.source={cfg.data.source!r} "
            "has none: set data.source=shards or data.balance=false"
        )
    if cfg.data.prefetch < 0:
        errors.append(f"data.prefetch={cfg.data.prefetch}; use 0 (off) or a positive depth")
    memory_gb = cfg.cluster.get("gpu_memory_gb") if cfg.cluster else None
    if memory_gb and not errors:
        need = estimate_memory(cfg, spec, world_size).total_gb
        if need > memory_gb:
            errors.append(
                f"needs about {need:.0f} GB per GPU (estimate) but the GPU has "
                f"{memory_gb} GB; raise tensor/pipeline parallelism, turn on "
                "model.recompute=full, or lower data.seq_length/micro_batch"
            )
    if errors:
        raise RecipeError(f"{where}: " + "; ".join(errors))
    return layout


def layout_notes(cfg: RunConfig, world_size: int) -> list[str]:
    """What a run that can work should still be told (printed at the start of training)."""
    gpus = cfg.parallel.gpus
    if gpus is None or gpus == world_size:
        return []
    return [
        f"the recipe is laid out for parallel.gpus={gpus} ranks, this run has {world_size}: "
        "the data-parallel size (and with it the micro-batches per rank and the per-rank "
        f"memory) differs from the recipe's; set parallel.gpus={world_size} to silence this"
    ]


def packing_multiples(cfg: RunConfig) -> tuple[int, int]:
    """(tokens each packed sample is padded to a multiple of, tokens a row must be a multiple of).

    Context parallelism cuts every sub-sample into 2 x CP chunks; FP8 GEMMs want multiples of
    16 (NeMo's packed-sequence rule); sequence parallelism scatters each CP rank's seq/CP tokens
    over the TP ranks.
    """
    p = cfg.parallel
    per_sample = 2 * p.context if p.context > 1 else 1
    if cfg.model.fp8_recipe:
        per_sample = math.lcm(per_sample, 16)
    if cfg.data.pad_to_multiple is not None:
        per_sample = cfg.data.pad_to_multiple
    per_row = per_sample
    if p.sequence_parallel:
        per_row = math.lcm(per_row, p.context * p.tensor)
    return per_sample, per_row


def _sequence_errors(cfg: RunConfig, layout: ParallelLayout) -> list[str]:
    chosen = cfg.data.pad_to_multiple
    if chosen is not None:
        needed = packing_multiples(dataclasses.replace(cfg, data=_without_padding(cfg)))[0]
        if chosen < 1 or chosen % needed:
            return [
                f"data.pad_to_multiple={chosen} is not a positive multiple of {needed} (what "
                "context parallelism / FP8 need); use a multiple of it or null"
            ]
    seq = cfg.data.seq_length
    per_sample, per_row = packing_multiples(cfg)
    if seq % per_row:
        needs = [f"2 x context={2 * layout.context}"] if layout.context > 1 else []
        needs += ["16 (FP8)"] if cfg.model.fp8_recipe else []
        if layout.sequence_parallel:
            needs.append(f"context x tensor={layout.context * layout.tensor} (sequence parallel)")
        return [
            f"data.seq_length={seq} is not a multiple of {per_row} (the least common multiple "
            f"of {', '.join(needs)}); use e.g. {max(per_row, seq - seq % per_row)}"
        ]
    # Synthetic rows hold samples of seq/4, seq/2 and seq/4 tokens, unpadded.
    if cfg.data.source == "synthetic" and per_sample > 1 and seq % (4 * per_sample):
        return [
            f"data.source=synthetic with context={layout.context}: its samples of "
            f"seq_length/4 tokens must be multiples of {per_sample}; use a data.seq_length "
            f"that is a multiple of {4 * per_sample}"
        ]
    return []


def _without_padding(cfg: RunConfig):
    return dataclasses.replace(cfg.data, pad_to_multiple=None)


def _video_frames_errors(cfg: RunConfig) -> list[str]:
    from megatron_internvl.data.errors import DataError
    from megatron_internvl.data.samples import video_frame_ranges

    try:
        video_frame_ranges(cfg.data.video_frames, len(cfg.data.shards))
    except DataError as error:
        return [str(error)]
    return []


def _validation_set_errors(cfg: RunConfig) -> list[str]:
    """data.valid_shards, train.valid_interval and train.valid_batches."""
    errors = []
    t, data = cfg.train, cfg.data
    if t.valid_interval < 0:
        errors.append(
            f"train.valid_interval={t.valid_interval}; use 0 (evaluate after the last step "
            "only) or a positive number of steps"
        )
    if t.valid_batches is not None and t.valid_batches < 1:
        errors.append(
            f"train.valid_batches={t.valid_batches}; use a positive number of global batches, "
            "or null for the whole held-out set"
        )
    if data.valid_shards is not None:
        if data.source != "shards":
            errors.append(
                f"data.valid_shards needs data.source=shards (got {data.source!r}); remove "
                "data.valid_shards or train on shards"
            )
        if not data.valid_shards:
            errors.append(
                "data.valid_shards=[] holds no shards; list held-out shard paths or set it null"
            )
    elif t.valid_interval or t.valid_batches is not None:
        errors.append(
            "train.valid_interval / train.valid_batches are set but data.valid_shards is not; "
            "set data.valid_shards=[<held-out shard dir or .tar>, ...]"
        )
    return errors


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU memory of the busiest pipeline stage (stage 0, which also holds the ViT)."""

    weights_and_optimizer_gb: float
    activations_gb: float

    @property
    def total_gb(self) -> float:
        return self.weights_and_optimizer_gb + self.activations_gb


def estimate_memory(cfg: RunConfig, spec: InternVLSpec, world_size: int) -> MemoryEstimate:
    """A deliberately simple estimate, for refusing recipes that cannot fit.

    Weights: bf16 param (2 B) + fp32 grad (4 B) + fp32 master and Adam moments (12 B, divided
    over data-parallel ranks with the distributed optimizer). Activations (Korthikanti et al.
    2022, flash attention, SP): s*b*h*(10 + 24/t) bytes per layer without recomputation,
    2*s*b*h/t per layer plus one full layer with full recomputation; stage 0 keeps `pp`
    micro-batches in flight under 1F1B; the ViT adds its own layers over the row's tiles.
    """
    layout = layout_of(cfg)
    tp, pp = layout.tensor, layout.pipeline
    dp = max(world_size // layout.model_parallel, 1)
    lang, vit = spec.language, spec.vision
    h = lang.hidden_size
    layers = cfg.model.num_layers or lang.num_layers
    stage0_layers = cfg.parallel.first_stage_layers or math.ceil(layers / pp)
    per_layer = 4 * h * h + 3 * h * lang.ffn_hidden_size  # attention (GQA upper bound) + SwiGLU
    vit_params = vit.num_layers * (
        4 * vit.hidden_size**2 + 2 * vit.hidden_size * vit.ffn_hidden_size
    )
    proj_params = spec.projector_input_size * h + h * h
    vt = layout.vision_tensor_size  # the ViT's TP; its replicas split the tiles
    llm_params = stage0_layers * per_layer + lang.vocab_size * h
    params = llm_params / tp + (vit_params + proj_params) / vt
    optimizer_bytes = 12 / dp if cfg.parallel.distributed_optimizer else 12
    weights = params * (2 + 4 + optimizer_bytes)

    s = cfg.data.seq_length / layout.context
    b = cfg.train.micro_batch
    in_flight = pp
    if cfg.model.recompute in ("full", "full+vit"):
        llm_act = (2 * s * b * h / tp) * stage0_layers * in_flight + s * b * h * (10 + 24 / tp)
    else:
        llm_act = s * b * h * (10 + 24 / tp) * stage0_layers * in_flight
    tiles = math.ceil(cfg.data.max_tiles_per_row * b / layout.vision_replicas)
    vit_tokens = tiles * (vit.num_patches + 1)
    vit_act = (
        vit_tokens
        * vit.hidden_size
        * (10 + 24 / vt)
        * (1 if cfg.model.recompute in ("full", "full+vit") else vit.num_layers)
    )
    return MemoryEstimate(weights / 2**30, (llm_act + vit_act) * 1.1 / 2**30)
