"""`hydra/launcher=megatron_internvl`: runs a sweep's jobs the way the sweep's `launch` section
says: local subprocesses (`launch.jobs` points at a time, each on `launch.nproc` ranks through
torchrun), or one Slurm array task per point, each the project's own job script (srun, one task
per GPU, preemption -> save -> requeue), which also covers multi-node points."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

ConfigStore.instance().store(
    group="hydra/launcher",
    name="megatron_internvl",
    node={"_target_": "hydra_plugins.megatron_internvl_sweeps.launcher.ProjectLauncher"},
    provider="megatron_internvl",
)


class ProjectLauncher(Launcher):
    def __init__(self) -> None:
        self.config: DictConfig | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from megatron_internvl.sweeps import multirun

        assert self.config is not None
        return multirun.launch_jobs(self.config, job_overrides)
