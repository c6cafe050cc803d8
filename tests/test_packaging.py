"""A non-editable install works from any directory: the wheel built from this checkout carries
the recipes and Slurm templates, and its entry points find them through the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (
    "megatron_internvl",
    "hydra_plugins",
    "recipes",
    "slurm",
    "pyproject.toml",
    "setup.py",
    "MANIFEST.in",
    "README.md",
)


def _copy_sources(to: Path) -> Path:
    """The files a `pip install .` reads, copied so the build writes nothing into the repo."""
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, to / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, to / name)
    return to


def test_the_wheel_runs_from_another_directory(tmp_path):
    source = _copy_sources(tmp_path / "src")
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(  # the venv's setuptools (no network); dependencies are already installed
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), source],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("megatron_internvl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "megatron_internvl/_data/recipes/recipe/internvl2_5_78b_stage2.yaml" in names
    assert "megatron_internvl/_data/slurm/train.sbatch.template" in names
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of any editable install

    def run(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    where = run("-c", "import megatron_internvl.resources as r; print(r.__file__, r.RECIPES)")
    assert where.split() == [
        str(site / "megatron_internvl" / "resources.py"),
        str(site / "megatron_internvl" / "_data" / "recipes"),
    ]
    assert "internvl2_5_78b_stage2" in run("-m", "megatron_internvl.train", "--help")
    job = run("-m", "megatron_internvl.train", "recipe=internvl2_5_1b_stage1", "--cfg", "job")
    assert "flavour: internvl2_5_1b" in job
    script = run(
        "-m",
        "megatron_internvl.launch",
        "recipe=internvl2_5_1b_stage1",
        "cluster=h100_pyxis",
        "cluster.nodes=64",
        "cluster.container_image=registry.example.com/lab/megatron-internvl:latest",
        "data.shards=[/data/shards]",
        "data.tokenizer=/models/tok",
        "--dry-run",
    )
    assert script.startswith("#!/bin/bash") and "srun" in script
    assert list(elsewhere.iterdir()) == []
