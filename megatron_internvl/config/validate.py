"""Checks that a run can work, before anything is allocated; every error says what to change."""

from __future__ import annotations

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
            p.tensor, p.pipeline, p.virtual_pipeline, p.context, p.sequence_parallel
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
    seq = cfg.data.seq_length
    if layout.context > 1 and seq % (2 * layout.context):
        errors.append(f"seq_length={seq} is not divisible by 2 x context={2 * layout.context}")
    if layout.sequence_parallel and seq % tp:
        errors.append(
            f"seq_length={seq} is not divisible by tensor_parallel={tp} (needed "
            "by sequence parallelism)"
        )
    if cfg.model.fp8_recipe and cfg.model.backend != "te":
        errors.append("FP8 needs the Transformer Engine backend: set model.backend=te")
    if cfg.model.fp8_recipe and cfg.model.dtype != "bfloat16":
        errors.append("FP8 needs model.dtype=bfloat16")
    if cfg.data.source == "shards" and not cfg.data.shards:
        errors.append("data.source=shards needs data.shards=[<shard dir or .tar>, ...]")
    if cfg.data.source == "shards" and not cfg.data.tokenizer:
        errors.append("data.source=shards needs data.tokenizer=<HF tokenizer directory>")
    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps is not None else int(t.warmup_fraction * t.steps)
    if warmup >= t.steps:
        errors.append(
            f"the warm-up ({warmup} steps) must be shorter than train.steps={t.steps}; "
            "lower train.warmup_steps or raise train.steps"
        )
    if cfg.train.stage not in ("1", "1.5", "2"):
        errors.append(f"train.stage={cfg.train.stage!r}; use '1', '1.5' or '2'")
    if cfg.train.nonfinite not in ("skip", "stop"):
        errors.append(f"train.nonfinite={cfg.train.nonfinite!r}; use 'skip' or 'stop'")
    errors += _validation_set_errors(cfg)
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
    params = (stage0_layers * per_layer + lang.vocab_size * h + vit_params + proj_params) / tp
    optimizer_bytes = 12 / dp if cfg.parallel.distributed_optimizer else 12
    weights = params * (2 + 4 + optimizer_bytes)

    s = cfg.data.seq_length / layout.context
    b = cfg.train.micro_batch
    in_flight = pp
    if cfg.model.recompute == "full":
        llm_act = (2 * s * b * h / tp) * stage0_layers * in_flight + s * b * h * (10 + 24 / tp)
    else:
        llm_act = s * b * h * (10 + 24 / tp) * stage0_layers * in_flight
    tiles = cfg.data.max_tiles_per_row * b
    vit_tokens = tiles * (vit.num_patches + 1)
    vit_act = (
        vit_tokens
        * vit.hidden_size
        * (10 + 24 / tp)
        * (1 if cfg.model.recompute == "full" else vit.num_layers)
    )
    return MemoryEstimate(weights / 2**30, (llm_act + vit_act) * 1.1 / 2**30)
