"""Sweeps through Hydra multirun:
`python -m megatron_internvl.sweeps.app --multirun --config-name <sweep> [overrides]`.

<sweep> is a recipe in recipes/sweep/; its base (recipes/sweep/base/hydra.yaml) selects the
`scaling_law` sweeper and the project's launcher. `tools/sweep.py launch` runs exactly this.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from megatron_internvl.sweeps.config import SWEEP_RECIPES, SweepConfig

ConfigStore.instance().store(name="sweep_schema", node=SweepConfig)


@hydra.main(version_base="1.3", config_path=str(SWEEP_RECIPES), config_name=None)
def main(config: DictConfig) -> int:
    from megatron_internvl.sweeps.multirun import run_point

    if OmegaConf.select(config, "point") is None:
        print("error: a sweep runs as a multirun: add --multirun (-m)", file=sys.stderr)
        sys.exit(2)
    return run_point(config)


def _usage() -> str:
    recipes = ", ".join(sorted(p.stem for p in SWEEP_RECIPES.glob("*.yaml")))
    return (
        f"{__doc__.strip()}\n\nusage: python -m megatron_internvl.sweeps.app --multirun "
        f"--config-name SWEEP [overrides]\nSWEEP: {recipes}\n"
        "With --config-name SWEEP, --help shows that sweep's configuration."
    )


if __name__ == "__main__":
    if {"--help", "-h"} & set(sys.argv[1:]) and "--config-name" not in sys.argv:
        print(_usage())  # Hydra's own help needs a sweep to describe
        sys.exit(0)
    main()
