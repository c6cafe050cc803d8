"""The training and launch entries behave like Hydra apps, run from another directory: `--help`
lists the recipes, `--cfg job` prints the composed config only once it passed the checks,
`--info` is Hydra's; a mistyped recipe, cluster or key is one line naming the closest matches,
exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=tmp_path,  # not the repository: recipes are found through the package
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("module", ["megatron_internvl.train", "megatron_internvl.launch"])
def test_help_lists_recipes_and_groups(tmp_path, module):
    result = _run(tmp_path, module, "--help")
    assert result.returncode == 0, result.stderr
    assert f"== {module} ==" in result.stdout
    recipes = sorted(p.stem for p in (ROOT / "recipes" / "recipe").glob("*.yaml"))
    recipe_line = next(line for line in result.stdout.splitlines() if line.startswith("recipe:"))
    assert recipe_line.removeprefix("recipe: ").split(", ") == recipes
    assert any(line.startswith("cluster: ") for line in result.stdout.splitlines())
    assert list(tmp_path.iterdir()) == []  # Hydra wrote no outputs/ or logs


def test_cfg_job_prints_the_composed_78b_recipe(tmp_path):
    result = _run(
        tmp_path, "megatron_internvl.train", "recipe=internvl2_5_78b_stage2", "--cfg", "job"
    )
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["name"] == "internvl2_5_78b_stage2"
    assert cfg["model"]["flavour"] == "internvl2_5_78b"
    assert (cfg["parallel"]["tensor"], cfg["parallel"]["pipeline"]) == (8, 4)
    assert cfg["train"]["lr"] == 2e-5  # the recipe's own line over the stage's 4e-5


def test_cfg_job_refuses_a_layout_that_cannot_run(tmp_path):
    result = _run(
        tmp_path,
        "megatron_internvl.train",
        "recipe=internvl2_5_78b_stage2",
        "parallel.tensor=6",
        "--cfg",
        "job",
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "not divisible by tensor_parallel=6" in result.stderr


def test_info_is_hydras(tmp_path):
    result = _run(tmp_path, "megatron_internvl.launch", "--info", "defaults")
    assert result.returncode == 0, result.stderr
    assert "Defaults List" in result.stdout and "recipe/demo_cpu" in result.stdout


@pytest.mark.parametrize(
    ("module", "args", "expected"),
    [
        (
            "megatron_internvl.train",
            ["recipe=internvl2_5_8b_stage3"],
            "no recipe named 'internvl2_5_8b_stage3'; did you mean internvl2_5_8b_stage2",
        ),
        (
            "megatron_internvl.launch",
            ["recipe=internvl2_5_8b_stage2", "cluster=h100", "--dry-run"],
            "no cluster named 'h100'; did you mean h100_pyxis?",
        ),
        ("megatron_internvl.train", ["trian.steps=3"], "unknown key 'trian'; did you mean train"),
        (
            "megatron_internvl.train",
            ["train.stepz=3"],
            "unknown key 'train.stepz'; did you mean train.steps",
        ),
        (
            "megatron_internvl.train",
            ["recipe=internvl2_5_8b_stage2", "stage=1"],
            "Config group override must be a string or a list. Got int: a config group option",
        ),
        (
            "megatron_internvl.train",
            ["train.steps=many"],
            "train.steps: Value 'many' of type 'str' could not be converted to Integer",
        ),
    ],
)
def test_a_typo_is_one_line_with_the_closest_matches(tmp_path, module, args, expected):
    result = _run(tmp_path, module, *args)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: {expected}"), result.stderr
    assert result.stdout == ""
