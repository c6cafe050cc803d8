"""`hydra/sweeper=scaling_law`: a multirun over a sweep recipe's points.

Hydra's basic sweeper takes the cartesian product of overrides; a scaling-law sweep is not one
(an IsoFLOP point's steps depend on its model size and the data). This sweeper plans the points
(megatron_internvl.sweeps.plan), leaves out the finished ones, and hands one job per point
(`point=<id>`) to whichever Hydra launcher is configured.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

ConfigStore.instance().store(
    group="hydra/sweeper",
    name="scaling_law",
    node={"_target_": "hydra_plugins.megatron_internvl_sweeps.sweeper.ScalingLawSweeper"},
    provider="megatron_internvl",
)


class ScalingLawSweeper(Sweeper):
    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from megatron_internvl.config.validate import RecipeError
        from megatron_internvl.sweeps import multirun
        from megatron_internvl.sweeps.config import SweepError

        assert self.config is not None and self.launcher is not None
        try:
            jobs = multirun.plan_jobs(self.config, arguments)
            if not jobs:
                return []
            self.validate_batch_is_legal(jobs)
            returns = self.launcher.launch(jobs, initial_job_idx=0)
            multirun.check_returns(self.config, jobs, returns)
        except (SweepError, RecipeError) as error:  # says what to change: no traceback
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        return returns
