"""Build hook: a wheel carries the repository's `recipes/` (Hydra configs) and `slurm/` (job
templates) inside the package, as `megatron_internvl/_data/{recipes,slurm}`, where
`megatron_internvl/resources.py` finds them; so a non-editable `pip install .` works from any
directory. Editable installs read the checkout's own folders. Everything else is in
pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DATA_FOLDERS = ("recipes", "slurm")


class BuildPyWithDataFolders(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for name in DATA_FOLDERS:
            shutil.copytree(
                Path(__file__).resolve().parent / name,
                Path(self.build_lib) / "megatron_internvl" / "_data" / name,
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )


setup(cmdclass={"build_py": BuildPyWithDataFolders})
