"""Where the package's data folders are: `recipes/` (Hydra configs) and `slurm/` (job templates).

In a source checkout (or an editable install) they are the repository's top-level folders; a
wheel carries them inside the package as `megatron_internvl/_data/<name>` (setup.py maps them
there), so a non-editable `pip install .` finds them from any working directory.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """The `recipes` or `slurm` folder of this installation."""
    installed = _PACKAGE / "_data" / name
    if installed.is_dir():
        return installed
    return _PACKAGE.parent / name


RECIPES = data_dir("recipes")
SLURM_TEMPLATES = data_dir("slurm")
