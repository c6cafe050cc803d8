"""Render a recipe into an sbatch script (one task per GPU through srun), and submit it.

The job asks Slurm for SIGUSR1 `signal_seconds` before its time limit (`--signal`, delivered to
every task); the training ranks save and exit with REQUEUE_EXIT_CODE; the batch script then
requeues the job (`scontrol requeue`) up to `max_requeues` times, and the next attempt resumes
from the latest committed checkpoint. Any other failure ends the job.
"""

from __future__ import annotations

import shlex
import string
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_internvl.resources import SLURM_TEMPLATES
from megatron_internvl.training.signals import REQUEUE_EXIT_CODE

TEMPLATE = SLURM_TEMPLATES / "train.sbatch.template"

# What a large Megatron run sets; every entry can be overridden by the cluster's `env`.
DEFAULT_ENV: dict[str, str] = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # ordered TP comm/compute overlap in Megatron
    "NCCL_IB_TIMEOUT": "22",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a hung collective kills the job, not hangs it
    "OMP_NUM_THREADS": "1",
}


@dataclass
class ClusterConfig:
    """Where and how a job runs; a lab writes it once (recipes/cluster/<name>.yaml)."""

    nodes: int = 1
    """Nodes of the allocation."""
    gpus_per_node: int = 8
    """GPUs (= training tasks) per node; 0 runs CPU tasks (`tasks_per_node` of them)."""
    tasks_per_node: int | None = None
    """Tasks per node when gpus_per_node is 0 (CPU runs)."""
    partition: str | None = None
    """Slurm partition."""
    account: str | None = None
    """Slurm account."""
    time: str = "04:00:00"
    """Time limit of one attempt."""
    container_image: str | None = None
    """A pyxis/enroot image (.sqsh file or registry reference); None runs on the host."""
    container_mounts: list[str] = field(default_factory=list)
    """pyxis mounts, "src:dst"."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra or overriding environment variables."""
    max_requeues: int = 20
    """Requeues after preemption/time limit before the job gives up."""
    signal_seconds: int = 300
    """How long before the time limit Slurm sends SIGUSR1 (time to finish a step and save)."""
    python: str = "python"
    """Python interpreter inside the job (a venv's, or the container's)."""
    gpu_memory_gb: int | None = None
    """GPU memory, for the recipe's memory check."""

    @property
    def tasks(self) -> int:
        return self.nodes * (self.gpus_per_node or self.tasks_per_node or 1)


class LaunchError(ValueError):
    """A request refused before sbatch; the message says what to fix."""


def cluster_config(values: dict[str, Any]) -> ClusterConfig:
    unknown = set(values) - set(ClusterConfig.__dataclass_fields__)
    if unknown:
        raise LaunchError(
            f"unknown cluster settings {sorted(unknown)}; known: "
            f"{sorted(ClusterConfig.__dataclass_fields__)}"
        )
    return ClusterConfig(**values)


def check_cluster(cluster: ClusterConfig) -> None:
    if cluster.nodes < 1:
        raise LaunchError(f"cluster.nodes={cluster.nodes}: need at least one node")
    image = cluster.container_image
    if image and (image.endswith(".sqsh") or image.startswith("/")) and not Path(image).exists():
        raise LaunchError(
            f"cluster.container_image={image} does not exist; build it with "
            "`enroot import` or give a registry reference"
        )


def render(
    name: str, run_dir: Path, overrides: list[str], cluster: ClusterConfig, layout_text: str
) -> str:
    """The sbatch script for `overrides` (the same Hydra overrides `train` takes)."""
    sbatch = [
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={cluster.nodes}",
        f"#SBATCH --ntasks-per-node={cluster.gpus_per_node or cluster.tasks_per_node or 1}",
        f"#SBATCH --time={cluster.time}",
        f"#SBATCH --signal=USR1@{cluster.signal_seconds}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={run_dir}/logs/slurm-%j.out",
    ]
    if cluster.gpus_per_node:
        sbatch.append(f"#SBATCH --gpus-per-node={cluster.gpus_per_node}")
    if cluster.partition:
        sbatch.append(f"#SBATCH --partition={cluster.partition}")
    if cluster.account:
        sbatch.append(f"#SBATCH --account={cluster.account}")
    env = {**(DEFAULT_ENV if cluster.gpus_per_node else {"OMP_NUM_THREADS": "1"}), **cluster.env}
    srun = ["srun", "--kill-on-bad-exit=1", "--label"]
    if cluster.container_image:
        srun.append(f"--container-image={cluster.container_image}")
        if cluster.container_mounts:
            srun.append(f"--container-mounts={','.join(cluster.container_mounts)}")
    command = [cluster.python, "-m", "megatron_internvl.launch.task", *overrides]
    return string.Template(TEMPLATE.read_text()).substitute(
        sbatch="\n".join(sbatch),
        layout=layout_text,
        run_dir=shlex.quote(str(run_dir)),
        env="\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
        srun=" ".join(srun),
        command=" ".join(shlex.quote(c) for c in command),
        requeue_code=REQUEUE_EXIT_CODE,
        max_requeues=cluster.max_requeues,
    )


def submit(script: str, path: Path) -> str:
    """Write the script and sbatch it; returns sbatch's answer (the job id line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    result = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise LaunchError(f"sbatch {path} failed: {result.stderr.strip()}")
    return result.stdout.strip()
