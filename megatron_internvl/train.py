"""Entry point: `python -m megatron_internvl.train recipe=<name> [overrides]` under torchrun/srun.

Hydra composes `recipes/config.yaml` + the named recipe + command-line overrides; the result is
validated into `RunConfig` and handed to the training loop. Hydra's own working-directory and
logging changes are off: the run directory is <output_dir>/<name>, the same on every rank.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@contextmanager
def _beside_a_running_hydra() -> Iterator[None]:
    """Hydra allows one initialised instance per process; a Hydra app that composes training
    configs (the sweep multirun plans its points) parks its own while `compose` runs."""
    from hydra.core.global_hydra import GlobalHydra

    running = GlobalHydra.instance()
    parked = running.hydra
    running.clear()
    try:
        yield
    finally:
        running.hydra = parked


def compose(overrides: list[str]):
    """The composed config for these overrides (also used by the launcher and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore

    from megatron_internvl.config.schema import RunConfig

    # The schema is the base of every recipe: unknown keys and wrong types fail at compose.
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    with _beside_a_running_hydra(), initialize_config_dir(str(RECIPES), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    from megatron_internvl.config.schema import load_run_config
    from megatron_internvl.config.validate import RecipeError
    from megatron_internvl.training.loop import train

    cfg = load_run_config(compose(list(sys.argv[1:] if argv is None else argv)))
    try:
        return train(cfg)
    except RecipeError as error:  # nothing was allocated: say what to change, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
