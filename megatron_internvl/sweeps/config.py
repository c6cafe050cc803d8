"""A sweep declaration (recipes/sweep/<name>.yaml) as typed dataclasses, checked at the boundary.

A sweep starts from one training recipe (`recipe` + `overrides`, exactly what train.py takes) and
varies: model size (depth/width multipliers of the recipe's ViT and LLM), training tokens and
learning rate (`kind: grid`), or, for IsoFLOP sweeps (`kind: isoflop`), model size at a set of
compute budgets with the tokens chosen so that every point of a budget spends the same FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from megatron_internvl.resources import RECIPES

SWEEP_RECIPES = RECIPES / "sweep"


LOSS_CHOICES = ("auto", "valid_loss", "smoothed_loss", "final_loss")
PARAM_CHOICES = ("non_embedding", "total", "language", "language_total")


class SweepError(ValueError):
    """A sweep that cannot run as declared; the message says what to change."""


@dataclass
class ScaleAxes:
    """Sizes of one tower as multipliers of the base recipe's shape (a family, not a list)."""

    depth: list[float] = field(default_factory=lambda: [1.0])
    """Layer-count multipliers (layers x depth must be a whole number)."""
    width: list[float] = field(default_factory=lambda: [1.0])
    """Width multipliers: heads (and hidden, FFN) scale, the head size stays."""


@dataclass
class ModelsSection:
    vit: ScaleAxes = field(default_factory=ScaleAxes)
    """InternViT sizes."""
    llm: ScaleAxes = field(default_factory=ScaleAxes)
    """LLM sizes."""


@dataclass
class FlopsSection:
    sample_rows: int = 32
    """Packed rows drawn from the recipe's data to measure the mean FLOPs of a row (its tiles and
    sub-sample lengths), through the same function the MFU logging uses."""


@dataclass
class LaunchSection:
    backend: str = "local"
    """"local" (subprocesses on this machine) or "slurm" (one array task per point)."""
    nproc: int = 1
    """Ranks per point when local (the recipe's layout must fit them)."""
    jobs: int = 1
    """Points run at the same time when local."""
    cluster: str = "local_cpu"
    """recipes/cluster/<name>.yaml when backend=slurm."""
    cluster_overrides: list[str] = field(default_factory=list)
    """Overrides of that cluster config for every point, e.g. ["cluster.nodes=4"]."""
    max_parallel: int | None = None
    """Slurm array throttle (`--array=...%N`); None: no limit."""
    only: list[str] = field(default_factory=list)
    """Run only these point ids (e.g. a failed one, alone); empty: every point not done."""
    force: bool = False
    """Re-run points already done, from scratch."""
    dry_run: bool = False
    """Plan and print what would run (the array script for Slurm), run nothing."""


@dataclass
class FitSection:
    loss: str = "auto"
    """Which collected loss the laws fit: "auto" (validation loss when every finished point
    logged one, the standard for scaling laws; else the smoothed training loss),
    "valid_loss", "smoothed_loss" (EMA of the logged training losses) or "final_loss"."""
    smoothing: float = 0.6
    """EMA weight of the smoothed loss (TensorBoard's slider), in [0, 1)."""
    bootstrap: int = 200
    """Bootstrap resamples for the uncertainty of every fitted constant."""
    holdout_fraction: float = 0.2
    """Fraction of points (the largest compute) held out to measure extrapolation error."""
    seed: int = 0
    """Seed of the bootstrap."""
    params: str = "non_embedding"
    """The parameter count the laws call N: "non_embedding" (ViT + projector + LLM without its
    embeddings: Kaplan's N), "total" (with the embeddings), "language" / "language_total" (the
    LLM alone, without / with embeddings: for sweeps whose ViT is fixed, where the ViT is a
    constant offset). At tiny sizes the embeddings are most of the LLM and its output layer
    most of the FLOPs, so a law without them bends (Pearce & Song 2024)."""
    max_heldout_error: float = 0.05
    """Held-out points predicted worse than this relative error are flagged in fit.json and
    the report (the law does not extrapolate)."""


@dataclass
class SweepConfig:
    name: str = "sweep"
    """Sweep name: its directory is <output_dir>/<name>."""
    output_dir: str = "runs/sweeps"
    """Where sweep directories live."""
    recipe: str = "demo_cpu_shards"
    """The training recipe every point starts from (recipes/recipe/<name>.yaml)."""
    overrides: list[str] = field(default_factory=list)
    """Training overrides applied to every point (data paths, layout, logging...)."""
    kind: str = "grid"
    """"grid" (models x tokens x lr) or "isoflop" (models at each compute budget)."""
    models: ModelsSection = field(default_factory=ModelsSection)
    """Model sizes (both kinds)."""
    tokens: list[float] = field(default_factory=list)
    """Training tokens per point (grid), rounded to whole steps of global_batch x seq_length."""
    lr: list[float] = field(default_factory=list)
    """Peak learning rates (both kinds); empty keeps the recipe's."""
    budgets: list[float] = field(default_factory=list)
    """Training FLOPs per point (isoflop)."""
    min_steps: int = 4
    """IsoFLOP points that would train fewer steps are dropped (and reported)."""
    flops: FlopsSection = field(default_factory=FlopsSection)
    launch: LaunchSection = field(default_factory=LaunchSection)
    fit: FitSection = field(default_factory=FitSection)
    point: str | None = None
    """The one point a multirun job trains: set by the sweeper for each job, never by hand."""


def compose_sweep(name: str, overrides: list[str]) -> SweepConfig:
    """recipes/sweep/<name>.yaml + command-line overrides, merged onto the schema and checked."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    if not (SWEEP_RECIPES / f"{name}.yaml").is_file():
        known = sorted(p.stem for p in SWEEP_RECIPES.glob("*.yaml"))
        raise SweepError(f"no sweep recipe {name!r} in {SWEEP_RECIPES}; known: {known}")
    ConfigStore.instance().store(name="sweep_schema", node=SweepConfig)
    try:
        with initialize_config_dir(config_dir=str(SWEEP_RECIPES), version_base="1.3"):
            composed = compose(config_name=name, overrides=overrides)
        return load_sweep_config(composed)
    except SweepError:
        raise
    except Exception as error:  # Hydra/OmegaConf: bad override syntax, unknown key, wrong type
        hint = ""
        if type(error).__name__ == "OverrideParseException":
            hint = " (list items that contain '=' need quotes: overrides=['data.seq_length=256'])"
        raise SweepError(f"sweep {name}: {error}{hint}") from None


def load_sweep_config(values: DictConfig | dict) -> SweepConfig:
    """Merge onto the schema (unknown keys and wrong types raise here), then `check`."""
    merged = OmegaConf.merge(OmegaConf.structured(SweepConfig), values)
    cfg = OmegaConf.to_object(merged)
    check(cfg)
    return cfg


def check(cfg: SweepConfig) -> None:
    """Raise SweepError listing everything that is wrong with `cfg` and what to change."""
    errors: list[str] = []
    if cfg.kind not in ("grid", "isoflop"):
        errors.append(f"kind={cfg.kind!r}; use 'grid' or 'isoflop'")
    if cfg.kind == "grid" and not cfg.tokens:
        errors.append("a grid sweep needs tokens=[...] (training tokens per point)")
    if cfg.kind == "isoflop" and not cfg.budgets:
        errors.append("an isoflop sweep needs budgets=[...] (training FLOPs per point)")
    if cfg.kind == "isoflop" and cfg.tokens:
        errors.append("an isoflop sweep derives tokens from budgets: remove tokens=[...]")
    for tower in ("vit", "llm"):
        axes: ScaleAxes = getattr(cfg.models, tower)
        for axis in ("depth", "width"):
            values = getattr(axes, axis)
            if not values or any(v <= 0 for v in values):
                errors.append(f"models.{tower}.{axis}={values}: give positive multipliers")
    if any(t <= 0 for t in cfg.tokens):
        errors.append(f"tokens={cfg.tokens}: give positive token counts")
    if any(b <= 0 for b in cfg.budgets):
        errors.append(f"budgets={cfg.budgets}: give positive FLOP budgets")
    if any(lr <= 0 for lr in cfg.lr):
        errors.append(f"lr={cfg.lr}: give positive learning rates")
    if cfg.launch.backend not in ("local", "slurm"):
        errors.append(f"launch.backend={cfg.launch.backend!r}; use 'local' or 'slurm'")
    if cfg.launch.nproc < 1 or cfg.launch.jobs < 1:
        errors.append("launch.nproc and launch.jobs must be at least 1")
    if cfg.fit.loss not in LOSS_CHOICES:
        errors.append(f"fit.loss={cfg.fit.loss!r}; use one of {', '.join(LOSS_CHOICES)}")
    if cfg.fit.params not in PARAM_CHOICES:
        errors.append(f"fit.params={cfg.fit.params!r}; use one of {', '.join(PARAM_CHOICES)}")
    if not 0 <= cfg.fit.smoothing < 1:
        errors.append(f"fit.smoothing={cfg.fit.smoothing}: must be in [0, 1)")
    if not 0 <= cfg.fit.holdout_fraction < 1:
        errors.append(f"fit.holdout_fraction={cfg.fit.holdout_fraction}: must be in [0, 1)")
    if cfg.flops.sample_rows < 1:
        errors.append("flops.sample_rows must be at least 1")
    if any(o.split("=", 1)[0].lstrip("+~") in ("name", "output_dir") for o in cfg.overrides):
        errors.append("overrides may not set name or output_dir: the sweep names its points")
    if errors:
        raise SweepError(f"sweep {cfg.name}: " + "; ".join(errors))
