"""A sweep as a Hydra multirun: what the `scaling_law` sweeper and `megatron_internvl` launcher
plugins (hydra_plugins/megatron_internvl_sweeps/) and the app's task function do.

    python -m megatron_internvl.sweeps.app -m --config-name cpu_mini launch.jobs=2

The sweeper plans the points and makes one job per point not yet done (`point=<id>`); the
launcher runs them (the project's: local subprocesses or a Slurm array; or any Hydra launcher,
e.g. submitit_slurm, which calls `run_point` in each job).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig

from megatron_internvl.sweeps import launch as launch_mod
from megatron_internvl.sweeps.config import SweepConfig, SweepError, load_sweep_config
from megatron_internvl.sweeps.plan import POINT_FILE, read_points, sweep_dir

PROJECT_LAUNCHER = "hydra_plugins.megatron_internvl_sweeps.launcher.ProjectLauncher"


def sweep_config(config: DictConfig) -> SweepConfig:
    """The sweep declaration inside a Hydra config (everything but its `hydra` node)."""
    return load_sweep_config({key: config[key] for key in config if key != "hydra"})


def _refuse_hydra_sweeps(arguments: list[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    swept = [
        o.input_line for o in OverridesParser.create().parse_overrides(arguments)
        if o.is_sweep_override()
    ]  # fmt: skip
    if swept:
        raise SweepError(
            f"{swept}: a scaling-law sweep's axes are lists in the sweep recipe (e.g. "
            "lr=[1e-4,3e-4], models.llm.depth=[0.5,1]), not Hydra's comma sweeps"
        )


def plan_jobs(config: DictConfig, arguments: list[str]) -> list[list[str]]:
    """Plan the sweep (plan.json, points/<id>/point.json) and return one job's overrides per
    point to run; a dry run writes nothing, prints what it would launch and returns none."""
    from megatron_internvl.sweeps.commands import plan

    _refuse_hydra_sweeps(arguments)
    cfg = sweep_config(config)
    if cfg.point is not None:
        raise SweepError("point= is set by the sweeper; to run one point: launch.only=[<id>]")
    result = plan(cfg, write=not cfg.launch.dry_run)  # a dry run writes nothing
    points = [dataclasses.asdict(p) for p in result.points]
    chosen = launch_mod.select(
        result.sweep_dir,
        points,
        cfg.launch.only or None,
        cfg.launch.force and not cfg.launch.dry_run,
    )
    print(
        f"sweep {cfg.name}: {len(chosen.run)} to run, {len(chosen.skipped)} already done",
        flush=True,
    )
    jobs = [[*arguments, f"point='{p['id']}'"] for p in chosen.run]
    if cfg.launch.dry_run:
        if str(config.hydra.launcher._target_) != PROJECT_LAUNCHER:
            print("\n".join(" ".join(job) for job in jobs))
        elif cfg.launch.backend == "slurm" and chosen.run:
            print(_slurm_scripts(cfg, chosen.run)[0])
        else:
            for point in chosen.run:
                point_dir = result.sweep_dir / "points" / point["id"]
                print(" ".join(launch_mod.point_command(point_dir, cfg.launch.nproc)))
        return []
    return jobs


def _slurm_scripts(cfg: SweepConfig, points: list[dict[str, Any]]) -> tuple[str, dict[str, str]]:
    return launch_mod.slurm_scripts(
        sweep_dir(cfg),
        cfg.name,
        points,
        cfg.launch.cluster,
        cfg.launch.cluster_overrides,
        cfg.launch.max_parallel,
    )


def _point_of(job: Sequence[str]) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(job)):
        if override.key_or_group == "point":
            return str(override.value())
    raise SweepError(f"job {list(job)} names no point")


def launch_jobs(config: DictConfig, jobs: Sequence[Sequence[str]]) -> list[JobReturn]:
    """The project launcher: the jobs' points as `launch.backend` says (see launch.py)."""
    cfg = sweep_config(config)
    sweep = sweep_dir(cfg)
    planned = {p["id"]: p for p in read_points(sweep)}
    points = [planned[_point_of(job)] for job in jobs]
    if cfg.launch.backend == "slurm":
        array, scripts = _slurm_scripts(cfg, points)
        answer = launch_mod.submit_slurm(sweep, array, scripts)
        print(
            f"{answer}: one array task per point; follow with `tools/sweep.py status {cfg.name}`"
            ", launch again to fill gaps",
            flush=True,
        )
        return [JobReturn(list(j), status=JobStatus.COMPLETED, _return_value=answer) for j in jobs]
    codes = launch_mod.run_local(sweep, points, cfg.launch.nproc, cfg.launch.jobs)
    returns = []
    for job, point in zip(jobs, points, strict=True):
        code = codes[point["id"]]
        ok = code == 0
        value = code if ok else _failure(cfg, point["id"], code)
        status = JobStatus.COMPLETED if ok else JobStatus.FAILED
        returns.append(JobReturn(list(job), status=status, _return_value=value))
    return returns


def _failure(cfg: SweepConfig, point_id: str, code: int) -> SweepError:
    from megatron_internvl.training.signals import REQUEUE_EXIT_CODE

    log = sweep_dir(cfg) / "points" / point_id / "train.log"
    if code == REQUEUE_EXIT_CODE:
        return SweepError(
            f"point {point_id} was interrupted by a signal and saved a checkpoint; "
            "launch the sweep again to resume it"
        )
    return SweepError(f"point {point_id} failed (exit code {code}); see {log}")


def check_returns(config: DictConfig, jobs: list[list[str]], returns: Sequence[JobReturn]) -> None:
    """Every job finished (or was submitted), or a SweepError naming the failed points."""
    failed = [
        _point_of(job) for job, r in zip(jobs, returns, strict=True)
        if r.status != JobStatus.COMPLETED
    ]  # fmt: skip
    if failed:
        cfg = sweep_config(config)
        raise SweepError(
            f"{len(failed)} of {len(jobs)} points failed: {', '.join(failed)}; logs: "
            f"{sweep_dir(cfg)}/points/<id>/train.log. Launch again to re-run them (finished "
            "points are skipped), or one alone with launch.only=[<id>]"
        )


def run_point(config: DictConfig) -> int:
    """The task function: train the job's point. Under submitit (Slurm) this process is one of
    the point's ranks (tasks_per_node per node); elsewhere it starts `launch.nproc` ranks on
    this machine through torchrun."""
    from megatron_internvl.sweeps.point import main as point_main

    cfg = sweep_config(config)
    if cfg.point is None:
        raise SweepError("a sweep runs as a multirun: add --multirun (-m)")
    point_dir = sweep_dir(cfg) / "points" / cfg.point
    record = json.loads((point_dir / POINT_FILE).read_text())
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        from submitit.helpers import TorchDistributedEnvironment

        ranks = TorchDistributedEnvironment().export(set_cuda_visible_devices=False).world_size
        if ranks != cfg.launch.nproc:
            raise SweepError(
                f"this job has {ranks} Slurm tasks (hydra.launcher nodes x tasks_per_node) but "
                f"the plan checked every point's layout for launch.nproc={cfg.launch.nproc}: "
                "make them equal"
            )
        code = point_main([str(point_dir.resolve())])
    else:
        code = launch_mod.run_local(sweep_dir(cfg), [record], cfg.launch.nproc, 1)[cfg.point]
    if code != 0:
        raise _failure(cfg, cfg.point, code)
    return code
