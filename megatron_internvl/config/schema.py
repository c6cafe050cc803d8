"""The run configuration: what a Hydra recipe resolves to, as typed dataclasses.

Hydra composes `recipes/`; `load_run_config` turns the result into these dataclasses (OmegaConf
checks types and unknown keys), and `megatron_internvl.config.validate` checks that the run can
work at all before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf


@dataclass
class ModelSection:
    flavour: str = "tiny_qwen_300m_style"
    """Registry name (see `tools/model_info.py --list`)."""
    spec_file: str | None = None
    """A JSON model shape (`models.registry.spec_to_dict`) used instead of `flavour`'s: shapes
    that are not in the registry, e.g. the depth/width-scaled models of a sweep."""
    num_layers: int | None = None
    """Override the LLM depth (reduced-depth benchmarks and demos); None keeps the flavour's."""
    vit_layers: int | None = None
    """Override the ViT depth; None keeps the flavour's."""
    backend: str = "local"
    """"local" (any device) or "te" (Transformer Engine; needed for FP8)."""
    dtype: str = "float32"
    """"float32" or "bfloat16"."""
    fp8_recipe: str | None = None
    """None, "delayed", "tensorwise" or "mxfp8" (needs backend=te and dtype=bfloat16)."""
    vision_pad_heads_to: int | None = None
    """Pad ViT heads to a multiple of this (default: the TP size)."""
    recompute: str | None = None
    """Activation recomputation: None, "selective" (attention core), "full" (whole LLM layers) or
    "full+vit" (whole LLM and ViT layers: the 6B ViT's activations over 48 tiles otherwise
    dominate pipeline stage 0)."""
    vit_drop_path: float = 0.0
    """ViT stochastic depth at the last layer (0.1 for 300M, 0.4 for 6B when the ViT trains)."""


@dataclass
class ParallelSection:
    tensor: int = 1
    """Tensor-parallel size."""
    pipeline: int = 1
    """Pipeline-parallel size."""
    virtual_pipeline: int | None = None
    """Model chunks per pipeline rank (interleaved 1F1B), or None."""
    context: int = 1
    """Context-parallel size (splits each packed row)."""
    sequence_parallel: bool = False
    """Sequence parallelism over the TP group."""
    vision_tensor: int | None = None
    """Tensor-parallel size of the ViT and projector; divides `tensor` (None: `tensor`). Smaller
    values split each micro-batch's tiles over tensor/vision_tensor ViT replicas (less head
    padding, fewer ViT all-reduces)."""
    first_stage_layers: int | None = None
    """LLM layers on pipeline stage 0 (which also runs the ViT); None splits evenly."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks."""
    gpus: int | None = None
    """The world size the recipe was laid out for (a run with another world size says so when
    it starts), or None: any world size."""


@dataclass
class TrainSection:
    stage: str = "2"
    """"1" (projector), "1.5" (ViT + projector) or "2" (everything)."""
    steps: int = 100
    """Optimizer steps."""
    global_batch: int = 8
    """Packed rows per optimizer step, over all data-parallel ranks."""
    micro_batch: int = 1
    """Packed rows per forward pass."""
    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int | None = None
    """Linear warm-up steps; None uses warmup_fraction."""
    warmup_fraction: float = 0.03
    """Warm-up as a fraction of steps when warmup_steps is None."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Gradient clipping by global norm."""
    seed: int = 1234
    """Seed of model init, dropout and data order."""
    nonfinite: str = "skip"
    """What a NaN/Inf loss or gradient does: "skip" the step or "stop" the run."""
    max_skipped_steps: int = 10
    """Stop after this many skipped steps in a row."""
    valid_interval: int = 0
    """Evaluate the validation loss (data.valid_shards) every N optimizer steps; 0: only after
    the last step. It is always evaluated after the last step when data.valid_shards is set."""
    valid_batches: int | None = None
    """Global batches (train.global_batch rows each) of the held-out set per evaluation; None:
    the whole set. Every evaluation reads the set from its start."""


@dataclass
class DataSection:
    source: str = "synthetic"
    """"synthetic" (generated rows) or "shards" (WebDataset shards through DALI)."""
    synthetic_text_vocab: int | None = None
    """Synthetic rows draw text from the first N token ids (None: every text id). A few
    thousand make the rows learnable within a few hundred steps (precision comparisons)."""
    seq_length: int = 64
    """Tokens per packed row."""
    max_tiles_per_row: int = 48
    """Image tiles per packed row."""
    loss_reduction: str = "square"
    """Per-sample loss weighting: "token", "sample" or "square"."""
    shards: list[str] = field(default_factory=list)
    """Shard paths or globs (source=shards)."""
    weights: list[float] = field(default_factory=list)
    """Mixture weights, one per entry of `shards` (empty: uniform)."""
    tokenizer: str | None = None
    """Directory of a HF tokenizer (source=shards)."""
    max_tiles_per_image: int = 12
    """Dynamic-tiling cap per image (12 in pretraining, 6 in fine-tuning)."""
    prefetch: int = 2
    """Micro-batches prepared ahead in background threads while a step computes (shards);
    0: prepared on the training thread when the step asks."""
    pad_to_multiple: int | None = None
    """Pad every packed sample to a multiple of this many tokens (masked from loss and
    attention); None: what the parallel layout needs (2 x context, 16 with FP8). A fixed value
    (a multiple of that need) makes the rows identical across layouts."""
    valid_shards: list[str] | None = None
    """Held-out shard paths or directories (same format as `shards`) for the validation loss
    (train.valid_interval, train.valid_batches); None: no validation."""
    caption_prompts: list[str] = field(default_factory=list)
    """Prompts a caption sample (image + .txt, img2dataset style) is asked with, one chosen per
    sample by its key; empty: the built-in stage-1 set (`data.samples.DEFAULT_CAPTION_PROMPTS`)."""
    caption_min: dict[str, float] = field(default_factory=dict)
    """Caption samples need these metadata fields (their .json) at or above the minimum, e.g.
    {width: 256, height: 256, similarity: 0.28}; others are skipped as "filtered"."""
    max_member_bytes: int = 64 << 20
    """Largest member (image, caption) read from a shard, in bytes; larger: skipped."""
    max_json_bytes: int = 4 << 20
    """Largest .json member parsed, in bytes."""
    max_json_depth: int = 32
    """Deepest JSON nesting parsed."""
    max_int_digits: int = 20
    """Longest integer literal in a sample's JSON."""
    max_turn_chars: int = 65536
    """Longest conversation turn (or caption) in characters, checked before tokenizing."""
    max_image_pixels: int = 36_000_000
    """Largest image (width x height from its header, before decoding)."""
    max_sample_pixels: int = 72_000_000
    """Largest total of image pixels in one sample."""
    max_video_frames: int = 4096
    """Longest video (frames) a sample may hold; counted from the container before decoding."""
    video_frames: list[Any] = field(default_factory=lambda: [8, 32])
    """[min, max] frames sampled per video (InternVL 2.5: 8 to 32), one tile each, for every
    dataset; or one [min, max] per entry of `shards`, in order (e.g. [[8, 32], [4, 16]]), where
    the held-out set (`valid_shards`) takes the first."""
    max_consecutive_drops: int = 200
    """The loader stops with an error after this many samples in a row were dropped."""
    balance: bool = False
    """Tile-aware data-parallel balancing (source=shards): every rank draws the same global
    stream, and each step's samples (those stream-order packing would put in the step's rows)
    are dealt to ranks and rows by cost (ViT tiles, LLM tokens, per-sample len^2; the FLOPs
    model), from tile and token counts read before decoding (a side file per shard, written on
    first use). false: each rank reads and packs its own strided share (the stream differs)."""


@dataclass
class CheckpointSection:
    save_every: int = 0
    """Save every N steps (0: only at the end and on signals)."""
    keep_last: int = 3
    """Committed checkpoints to keep."""
    async_save: bool = False
    """Write checkpoints in the background; committed once every rank has finished."""
    resume: bool = True
    """Resume from the latest committed checkpoint of this run if there is one."""
    overwrite: bool = False
    """Start a new run even where the run directory holds another: rank 0 first renames the old
    run directory to a sibling <name>.replaced-<UTC time> (nothing is deleted)."""
    pretrained: str | None = None
    """A converted checkpoint (model only) to start from when not resuming."""
    verify: bool = True
    """Check every file of a checkpoint against the checksums its commit marker records before
    resuming from it (a read of the whole checkpoint); false skips the check."""


@dataclass
class LoggingSection:
    log_every: int = 10
    """Console and TensorBoard every N steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under <run_dir>/tensorboard."""
    peak_tflops: float | None = None
    """Dense peak TFLOP/s of one device for MFU (None: 989 on H100/H200 bf16, none on CPU)."""


@dataclass
class RunConfig:
    name: str = "demo"
    """Experiment name: the run directory is <output_dir>/<name>."""
    output_dir: str = "runs"
    """Where run directories live."""
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    cluster: dict[str, Any] = field(default_factory=dict)
    """Launcher settings (recipes/cluster/, see launch/slurm.py ClusterConfig); ignored by
    training except gpu_memory_gb (the recipe's memory check)."""


def load_run_config(cfg: DictConfig | dict[str, Any]) -> RunConfig:
    """Merge a composed config onto the schema (type errors and unknown keys are raised here)."""
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
    return OmegaConf.to_object(merged)
