"""The model of a run: the resolved InternVL shape and this rank's DDP-wrapped chunks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from megatron_internvl.config.precision import PrecisionConfig
from megatron_internvl.config.schema import RunConfig
from megatron_internvl.models.internvl import build_internvl_chunks
from megatron_internvl.models.registry import InternVLSpec, get_spec, spec_from_dict
from megatron_internvl.parallel import runtime
from megatron_internvl.parallel.layout import ParallelLayout
from megatron_internvl.training.freezing import freeze_for_stage
from megatron_internvl.training.step import wrap_with_ddp


def resolved_spec(cfg: RunConfig) -> InternVLSpec:
    """The registry flavour (or `model.spec_file`'s shape) with the recipe's depth overrides."""
    if cfg.model.spec_file:
        spec = spec_from_dict(json.loads(Path(cfg.model.spec_file).read_text()))
    else:
        spec = get_spec(cfg.model.flavour)
    if cfg.model.num_layers:
        spec = dataclasses.replace(
            spec, language=dataclasses.replace(spec.language, num_layers=cfg.model.num_layers)
        )
    vision = dataclasses.replace(
        spec.vision,
        num_layers=cfg.model.vit_layers or spec.vision.num_layers,
        drop_path_rate=cfg.model.vit_drop_path,
    )
    return dataclasses.replace(spec, vision=vision)


def recompute_overrides(recompute: str | None) -> dict[str, Any]:
    """The LLM's TransformerConfig fields for model.recompute (None, "selective", "full" or
    "full+vit"; the ViT's part of "full+vit" is `vision_recompute` of build_internvl_chunks)."""
    if recompute is None:
        return {}
    if recompute in ("full", "full+vit"):
        return {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    return {"recompute_granularity": "selective"}


def build_model(cfg: RunConfig, spec: InternVLSpec, layout: ParallelLayout) -> list[Any]:
    """This rank's model chunks, frozen per `train.stage`, wrapped in Megatron DDP."""
    chunks = build_internvl_chunks(
        spec,
        layout,
        cfg.data.seq_length,
        first_stage_layers=cfg.parallel.first_stage_layers,
        vision_pad_heads_to=cfg.model.vision_pad_heads_to,
        backend=cfg.model.backend,
        precision=PrecisionConfig(cfg.model.dtype, cfg.model.fp8_recipe),
        vision_recompute=cfg.model.recompute == "full+vit",
        **recompute_overrides(cfg.model.recompute),
    )
    for chunk in chunks:
        runtime.adapt_model_config(chunk.config)
    freeze_for_stage(chunks, cfg.train.stage)
    return wrap_with_ddp(chunks, chunks[0].config, cfg.parallel.distributed_optimizer)
