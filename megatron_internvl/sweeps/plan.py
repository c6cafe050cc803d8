"""From a sweep declaration to its points: each one a training run (Hydra overrides of the
recipe) with its model shape, steps, tokens, planned FLOPs and parameter counts.

Compute per point is C = steps x global_batch x F_row, where F_row is the mean over rows drawn
from the recipe's own data loader of the FLOPs the MFU logging counts for a row
(`training.loop.step_flops` -> `training.flops.training_flops`): the ViT and projector once per
image tile in the row, the LLM over the row's sub-samples. So tiles per sample enter exactly as
the data packs them, not through an assumed average.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_internvl.sweeps.config import SweepConfig, SweepError
from megatron_internvl.sweeps.grid import Scale, grid_runs, model_scales, steps_for_tokens
from megatron_internvl.sweeps.isoflop import budget_label, steps_for_budget

POINT_FILE = "point.json"
SPEC_FILE = "spec.json"
"""The point's model shape, read by training through `model.spec_file`."""
PLAN_FILE = "plan.json"


@dataclass
class Point:
    """One training run of the sweep."""

    id: str
    """Directory name under <sweep>/points/ and the run's name."""
    model: str
    """Model id, e.g. "vit2x32_llm4x64" (layers x hidden of each tower)."""
    vit_depth: float
    vit_width: float
    llm_depth: float
    llm_width: float
    vit_layers: int
    vit_hidden: int
    llm_layers: int
    llm_hidden: int
    lr: float
    steps: int
    tokens: int
    """LLM tokens trained on: steps x global_batch x seq_length (padding included, as logged)."""
    flops: float
    """Planned training FLOPs: steps x global_batch x mean row FLOPs."""
    budget: float | None
    """The IsoFLOP budget the point belongs to (None in grid sweeps)."""
    params: dict[str, int]
    """Parameter counts by part (see models.info.scaling_parameter_counts)."""
    overrides: list[str]
    """Everything train.py needs: `python -m megatron_internvl.train <overrides>`."""
    spec: dict[str, Any] = field(repr=False)
    """The derived model shape (written to the point's spec.json for `model.spec_file`)."""


@dataclass
class Plan:
    sweep_dir: Path
    points: list[Point]
    dropped: list[str]
    """Why requested points were left out (e.g. an IsoFLOP budget too small for a model)."""
    row_flops: dict[str, float]
    """Mean FLOPs of one packed row, per model id."""
    data: dict[str, float]
    """What the sampled rows held: rows, mean tiles, mean sub-samples, seq_length."""

    def point(self, point_id: str) -> Point:
        for p in self.points:
            if p.id == point_id:
                return p
        raise SweepError(
            f"no point {point_id!r} in this sweep; points: {', '.join(p.id for p in self.points)}"
        )


def sweep_dir(cfg: SweepConfig) -> Path:
    return Path(cfg.output_dir) / cfg.name


def points_dir(cfg: SweepConfig) -> Path:
    return sweep_dir(cfg) / "points"


def _model_id(spec: Any) -> str:
    return (
        f"vit{spec.vision.num_layers}x{spec.vision.hidden_size}"
        f"_llm{spec.language.num_layers}x{spec.language.hidden_size}"
    )


def _compose(overrides: list[str]):
    from megatron_internvl.config.schema import load_run_config
    from megatron_internvl.train import compose

    try:
        return load_run_config(compose(overrides))
    except Exception as error:  # Hydra/OmegaConf: unknown recipe or key, bad value
        raise SweepError(f"training overrides {overrides} do not compose: {error}") from None


def _sample_rows(run_cfg: Any, spec: Any, tokenizer: Any, count: int) -> list[dict[str, Any]]:
    """What FLOPs need of rows as training would see them on data-parallel rank 0 (the same
    loader and packer): sub-sample bounds and tile count. Drawn one row at a time and the pixels
    dropped at once, so planning holds one row's images (a 1B row: up to 48 tiles of 448 px)
    instead of `count` rows' worth."""
    import torch

    from megatron_internvl.training.loop import data_source

    source = data_source(run_cfg, spec, 0, 1, tokenizer)
    rows = []
    try:
        for _ in range(count):
            (row,) = source.next_microbatches(1)
            tiles = 0 if row.get("images") is None else row["images"].size(0)
            rows.append(
                {
                    "cu_seqlens": row["cu_seqlens"],
                    "images": torch.empty(tiles, 0) if tiles else None,
                }
            )
            del row
    finally:
        if hasattr(source, "close"):  # shard sources run prefetch threads
            source.close()
    return rows


def _world_size(cfg: SweepConfig) -> int:
    if cfg.launch.backend == "local":
        return cfg.launch.nproc
    from megatron_internvl.launch.slurm import cluster_config

    composed = _compose([f"cluster={cfg.launch.cluster}", *cfg.launch.cluster_overrides])
    return cluster_config(dict(composed.cluster)).tasks


def build_plan(cfg: SweepConfig) -> Plan:
    """Expand `cfg` into points; every point's training config is validated here, before any
    run starts (RecipeError messages say what to change)."""
    import itertools

    from megatron_internvl.config.validate import RecipeError, validate
    from megatron_internvl.models.info import scaling_parameter_counts
    from megatron_internvl.models.registry import spec_to_dict
    from megatron_internvl.parallel import runtime
    from megatron_internvl.sweeps.families import scale_spec
    from megatron_internvl.training.loop import (
        fit_spec_to_tokenizer,
        load_tokenizer,
        resolved_spec,
        step_flops,
    )

    base_overrides = [f"recipe={cfg.recipe}", *cfg.overrides]
    base = _compose(base_overrides)
    base_spec = resolved_spec(base)
    tokenizer = load_tokenizer(base)
    rows = _sample_rows(
        base, fit_spec_to_tokenizer(base_spec, tokenizer), tokenizer, cfg.flops.sample_rows
    )
    # The loader hands out micro-batches: train.micro_batch rows flattened into one.
    packed_rows = len(rows) * base.train.micro_batch
    tiles = [0 if r.get("images") is None else r["images"].size(0) for r in rows]
    samples = [len(r["cu_seqlens"]) - 1 for r in rows]
    data = {
        "rows": packed_rows,
        "mean_tiles_per_row": sum(tiles) / packed_rows,
        "mean_samples_per_row": sum(samples) / packed_rows,
        "seq_length": base.data.seq_length,
        "global_batch": base.train.global_batch,
    }
    world = _world_size(cfg)
    tokens_per_step = base.train.global_batch * base.data.seq_length

    models: list[tuple[Scale, Any, float, dict[str, int]]] = []
    with runtime.single_process():
        for scale in model_scales(cfg):
            spec = scale_spec(
                base_spec, scale.vit_depth, scale.vit_width, scale.llm_depth, scale.llm_width
            )
            fitted = fit_spec_to_tokenizer(spec, tokenizer)
            row_flops = step_flops(fitted, rows, base.train.stage) / packed_rows
            models.append((scale, spec, row_flops, scaling_parameter_counts(fitted)))

    out = points_dir(cfg)
    points: list[Point] = []
    dropped: list[str] = []
    lrs = cfg.lr or [base.train.lr]
    if cfg.kind == "grid":
        runs = [
            (scale, spec, row_flops, params, None, steps_for_tokens(tokens, tokens_per_step), lr)
            for (scale, spec, row_flops, params) in models
            for tokens, lr in grid_runs(cfg, base.train.lr)
        ]
    else:
        runs = []
        for budget, (scale, spec, row_flops, params), lr in itertools.product(
            cfg.budgets, models, lrs
        ):
            steps = steps_for_budget(budget, row_flops * base.train.global_batch)
            if steps < cfg.min_steps:
                dropped.append(
                    f"{_model_id(spec)} at budget {budget:.3g}: {steps} steps < "
                    f"min_steps={cfg.min_steps}"
                )
                continue
            runs.append((scale, spec, row_flops, params, budget, steps, lr))

    for scale, spec, row_flops, params, budget, steps, lr in runs:
        model = _model_id(spec)
        tokens = steps * tokens_per_step
        point_id = (
            f"C{budget_label(budget)}-{model}" if budget is not None else f"{model}-tok{tokens}"
        )
        if len(lrs) > 1:
            point_id += f"-lr{lr:g}"
        overrides = [
            *base_overrides,
            f"model.spec_file={out / point_id / SPEC_FILE}",
            f"train.steps={steps}",
            f"train.lr={lr}",
            f"output_dir={out}",
            f"name={point_id}",
        ]
        run_cfg = _compose(overrides)
        try:
            validate(run_cfg, spec, world)
        except RecipeError as error:
            raise SweepError(f"point {point_id}: {error}") from None
        points.append(
            Point(
                id=point_id,
                model=model,
                vit_depth=scale.vit_depth,
                vit_width=scale.vit_width,
                llm_depth=scale.llm_depth,
                llm_width=scale.llm_width,
                vit_layers=spec.vision.num_layers,
                vit_hidden=spec.vision.hidden_size,
                llm_layers=spec.language.num_layers,
                llm_hidden=spec.language.hidden_size,
                lr=lr,
                steps=steps,
                tokens=tokens,
                flops=steps * base.train.global_batch * row_flops,
                budget=budget,
                params=params,
                overrides=overrides,
                spec=spec_to_dict(spec),
            )
        )
    ids = [p.id for p in points]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise SweepError(
            f"sweep {cfg.name}: two points share an id ({twice}); multipliers that round to the "
            "same shape, or tokens that round to the same steps, "
            "give the same run: remove the duplicates"
        )
    if not points:
        raise SweepError(f"sweep {cfg.name}: no points left ({'; '.join(dropped)})")
    return Plan(
        sweep_dir=sweep_dir(cfg),
        points=points,
        dropped=dropped,
        row_flops={_model_id(spec): f for _, spec, f, _ in models},
        data=data,
    )


def write_plan(cfg: SweepConfig, plan: Plan, force: bool = False) -> None:
    """Write plan.json and each point's point.json. A point already on disk with other settings
    is an error (its results would not be the point's), unless `force`."""
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    for point in plan.points:
        record = dataclasses.asdict(point)
        path = plan.sweep_dir / "points" / point.id / POINT_FILE
        if path.is_file() and not force:
            old = json.loads(path.read_text())
            if old["overrides"] != record["overrides"] or old["spec"] != record["spec"]:
                raise SweepError(
                    f"point {point.id} in {path.parent} was planned with other settings; "
                    "give the sweep another name or output_dir, or delete that point"
                )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        (path.parent / SPEC_FILE).write_text(json.dumps(record["spec"], indent=1))
    summary = {
        "sweep": dataclasses.asdict(cfg),
        "points": [p.id for p in plan.points],
        "dropped": plan.dropped,
        "row_flops": plan.row_flops,
        "data": plan.data,
    }
    (plan.sweep_dir / PLAN_FILE).write_text(json.dumps(summary, indent=1))


def read_points(sweep: Path) -> list[dict[str, Any]]:
    """The planned points of a sweep directory, in plan order."""
    path = sweep / PLAN_FILE
    if not path.is_file():
        raise SweepError(f"{sweep} has no {PLAN_FILE}; run `tools/sweep.py plan` first")
    ids = json.loads(path.read_text())["points"]
    return [json.loads((sweep / "points" / i / POINT_FILE).read_text()) for i in ids]
