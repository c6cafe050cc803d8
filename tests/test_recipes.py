"""Every scale's recipes compose, fit and divide at their GPU count; impossible ones fail before
anything is allocated, with a message that says what to change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_internvl.config.schema import load_run_config
from megatron_internvl.config.validate import RecipeError, estimate_memory, validate
from megatron_internvl.train import compose
from megatron_internvl.training.loop import resolved_spec

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "recipes" / "recipe").glob("internvl2_5_*.yaml"))


def _config(recipe: str, *overrides: str):
    cfg = load_run_config(
        compose([f"recipe={recipe}", "data.shards=[shards]", "data.tokenizer=tok", *overrides])
    )
    return cfg, resolved_spec(cfg)


def test_every_scale_and_stage_has_a_recipe():
    sizes = ["1b", "2b", "4b", "8b", "26b", "38b", "78b"]
    expected = {f"internvl2_5_{s}_stage{st}" for s in sizes for st in ("1", "2")}
    expected |= {"internvl2_5_8b_stage1_5", "internvl2_5_26b_stage1_5"}
    assert set(RECIPES) == expected


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_validates_and_fits_at_its_gpu_count(recipe):
    cfg, spec = _config(recipe)
    validate(cfg, spec, cfg.parallel.gpus)
    assert estimate_memory(cfg, spec, cfg.parallel.gpus).total_gb < 80
    assert cfg.model.dtype == "bfloat16" and cfg.model.backend == "te"
    assert cfg.data.seq_length == 16384 and cfg.data.loss_reduction == "square"
    size = recipe.split("_")[2]
    stage = cfg.train.stage
    lr = {"1": 2e-4, "1.5": 1e-5, "2": 4e-5 if size in ("1b", "2b", "4b", "8b") else 2e-5}
    assert cfg.train.lr == lr[stage]
    assert cfg.train.global_batch == (1024 if stage == "1.5" else 512)
    assert cfg.train.weight_decay == (0.01 if size in ("1b", "2b", "4b") else 0.05)
    large_vit = size in ("26b", "38b", "78b")
    assert cfg.model.vit_drop_path == (0.0 if stage == "1" else 0.4 if large_vit else 0.1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["parallel.tensor=6"],
            r"64 attention heads are not divisible by tensor_parallel=6; use "
            r"one of \[1, 2, 4, 8\]",
        ),
        (["parallel.first_stage_layers=18"], r"62 LLM layers do not split over 3 pipeline"),
        (
            ["train.global_batch=100"],
            r"global_batch=100 is not a multiple of micro_batch x "
            r"data_parallel = 1 x 32; use a multiple of 32",
        ),
        (
            [
                "parallel.tensor=1",
                "parallel.sequence_parallel=false",
                "parallel.pipeline=1",
                "parallel.first_stage_layers=null",
                "train.global_batch=1024",
            ],
            r"needs about \d+ GB per GPU",
        ),
        (
            ["model.backend=local", "model.fp8_recipe=tensorwise"],
            r"FP8 needs the Transformer "
            r"Engine backend",
        ),
    ],
)
def test_impossible_recipes_say_what_to_change(overrides, message):
    cfg, spec = _config("internvl2_5_78b_stage2", *overrides)
    with pytest.raises(RecipeError, match=message):
        validate(cfg, spec, cfg.parallel.gpus)


def test_fp8_is_one_override():
    cfg, spec = _config("internvl2_5_8b_stage2", "model.fp8_recipe=tensorwise")
    validate(cfg, spec, cfg.parallel.gpus)
    assert cfg.model.fp8_recipe == "tensorwise"


def test_unknown_keys_and_wrong_types_fail_at_compose():
    with pytest.raises(Exception, match=r"train\.stepz"):
        _config("demo_cpu", "train.stepz=3")
    with pytest.raises(Exception, match="steps"):
        _config("demo_cpu", "train.steps=many")


def test_train_entry_refuses_before_allocating():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_internvl.train",
            "recipe=internvl2_5_78b_stage2",
            "data.shards=[shards]",
            "parallel.tensor=6",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WORLD_SIZE": "1024", "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2
    assert "64 attention heads are not divisible by tensor_parallel=6" in result.stderr
    assert "init_process_group" not in result.stderr
