"""Render a recipe into an sbatch script (one task per GPU through srun), and submit it.

The job asks Slurm for SIGUSR1 `signal_seconds` before its time limit (`--signal`, delivered to
every task); the training ranks save and exit with REQUEUE_EXIT_CODE; the batch script then
requeues the job (`scontrol requeue`) up to `max_requeues` times, and the next attempt resumes
from the latest committed checkpoint. Any other failure ends the job.
"""

from __future__ import annotations

import re
import shlex
import string
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from megatron_internvl.resources import SLURM_TEMPLATES
from megatron_internvl.training.signals import REQUEUE_EXIT_CODE

TEMPLATE = SLURM_TEMPLATES / "train.sbatch.template"
PROJECT_ROOT = Path(__file__).resolve().parents[2]

# What a large Megatron run sets; every entry can be overridden by the cluster's `env`.
DEFAULT_ENV: dict[str, str] = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # ordered TP comm/compute overlap in Megatron
    "NCCL_IB_TIMEOUT": "22",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a hung collective kills the job, not hangs it
    "OMP_NUM_THREADS": "1",
}
CONTAINERS = ("none", "pyxis")


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
    """Slurm partition (or a comma-separated list)."""
    account: str | None = None
    """Slurm account."""
    time: str = "04:00:00"
    """Time limit of one attempt, in a format Slurm takes (MM, HH:MM:SS, D-HH:MM:SS ...)."""
    exclusive: bool = False
    """Ask for whole nodes (`--exclusive`)."""
    cpus_per_task: int | None = None
    """CPUs per task (`--cpus-per-task`); None: Slurm's default."""
    mem: str | None = None
    """Memory per node (`--mem`, e.g. "0" for all of it, "500G"); None: Slurm's default."""
    container: str = "none"
    """"pyxis": every task runs in `container_image` through pyxis/enroot; "none": on the host."""
    container_image: str | None = None
    """The pyxis/enroot image (.sqsh file or registry reference); required with pyxis."""
    container_mounts: list[str] = field(default_factory=list)
    """pyxis mounts, "src:dst"."""
    container_workdir: str | None = None
    """Working directory inside the container (default: this project's directory, which the
    mounts must make visible at the same path)."""
    interface: str | None = None
    """Network interface the ranks meet and talk over (e.g. "ib0"): rank 0's store listens on
    the first node's address there, and NCCL/gloo use it. None: the first node's host name."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra or overriding environment variables."""
    max_requeues: int = 20
    """Requeues after preemption/time limit before the job gives up."""
    signal_seconds: int = 300
    """How long before the time limit Slurm sends SIGUSR1 (time to finish a step and save)."""
    python: str | None = None
    """The project's Python in the job: an absolute path to the venv's interpreter on the host;
    inside a container, the container's (e.g. "python"). None: on the host, the interpreter
    running the launcher (this venv); in a container, "python"."""
    gpu_memory_gb: int | None = None
    """GPU memory, for the recipe's memory check."""

    @property
    def tasks(self) -> int:
        return self.nodes * (self.gpus_per_node or self.tasks_per_node or 1)


class LaunchError(ValueError):
    """A request refused before sbatch; the message says what to fix."""


# Values that reach #SBATCH lines (parsed by sbatch, not bash) or Slurm itself.
_SLURM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_PARTITIONS = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
_TIME = re.compile(r"\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+(:\d{2}(:\d{2})?)?")
_MEM = re.compile(r"\d+[KMGT]?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MINIMUM = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1}
_MINIMUM |= {"max_requeues": 0, "signal_seconds": 1, "gpu_memory_gb": 1}


def _refuse(key: str, value: Any, expected: str) -> LaunchError:
    return LaunchError(f"cluster.{key}={value!r}: expected {expected}")


def _check_type(key: str, value: Any) -> None:
    if key in _MINIMUM:
        least = _MINIMUM[key]
        if type(value) is not int or value < least:
            raise _refuse(key, value, f"a whole number >= {least}")
    elif key == "exclusive":
        if type(value) is not bool:
            raise _refuse(key, value, "true or false")
    elif key == "container_mounts":
        if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
            raise _refuse(key, value, 'a list of "src:dst" strings')
    elif key == "env":
        if not isinstance(value, dict):
            raise _refuse(key, value, "a mapping NAME: value")
    elif not isinstance(value, str):
        raise _refuse(key, value, "a string")


def _check_types(values: dict[str, Any]) -> None:
    for spec in fields(ClusterConfig):
        if values.get(spec.name) is not None:
            _check_type(spec.name, values[spec.name])


def _check_values(cluster: ClusterConfig) -> None:
    patterns = {
        "partition": (
            _PARTITIONS,
            "Slurm partition names (letters, digits, _ . -), comma-separated",
        ),
        "account": (_SLURM_NAME, "a Slurm account name (letters, digits, _ . -)"),
        "interface": (_SLURM_NAME, "a network interface name (letters, digits, _ . -)"),
        "time": (_TIME, "a Slurm time limit: MM, HH:MM:SS, D-HH or D-HH:MM:SS"),
        "mem": (_MEM, 'a Slurm memory size: a number with an optional K/M/G/T ("0" = all)'),
    }
    for key, (pattern, expected) in patterns.items():
        value = getattr(cluster, key)
        if value is not None and not pattern.fullmatch(value):
            raise _refuse(key, value, expected)
    if cluster.container not in CONTAINERS:
        raise _refuse("container", cluster.container, f"one of {CONTAINERS}")
    for key, value in cluster.env.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise _refuse(f"env.{key}", value, "a variable name (letters, digits, _)")
        if isinstance(value, (dict, list)):
            raise _refuse(f"env.{key}", value, "a string or number")
    for text in [cluster.python or "", cluster.container_image or "", *cluster.container_mounts]:
        if any(c in text for c in "\n\r\0"):
            raise LaunchError(f"cluster setting {text!r}: line breaks and NUL are not allowed")


def cluster_config(values: dict[str, Any]) -> ClusterConfig:
    """The cluster file's values, typed and checked; `python` resolved."""
    unknown = set(values) - set(ClusterConfig.__dataclass_fields__)
    if unknown:
        raise LaunchError(
            f"unknown cluster settings {sorted(unknown)}; known: "
            f"{sorted(ClusterConfig.__dataclass_fields__)}"
        )
    _check_types(values)
    cluster = ClusterConfig(**values)
    cluster.env = {k: str(v) for k, v in cluster.env.items()}
    _check_values(cluster)
    if cluster.python is None:
        cluster.python = "python" if cluster.container == "pyxis" else sys.executable
    return cluster


def check_cluster(cluster: ClusterConfig) -> None:
    if cluster.nodes < 1:
        raise LaunchError(f"cluster.nodes={cluster.nodes}: need at least one node")
    image = cluster.container_image
    if cluster.container == "pyxis" and not image:
        raise LaunchError(
            "the cluster file runs tasks in pyxis containers (container: pyxis) but names no "
            "image; set cluster.container_image=<.sqsh file or registry reference>, or "
            "cluster.container=none to run on the host"
        )
    if image and cluster.container != "pyxis":
        raise LaunchError(
            f"cluster.container_image={image} is set but cluster.container="
            f"{cluster.container!r}; set cluster.container=pyxis to use it"
        )
    if image and (image.endswith(".sqsh") or image.startswith("/")) and not Path(image).exists():
        raise LaunchError(
            f"cluster.container_image={image} does not exist; build it with "
            "`enroot import` or give a registry reference"
        )
    if cluster.container == "none" and not Path(cluster.python).is_absolute():
        raise LaunchError(
            f"cluster.python={cluster.python!r}: on the host, give the absolute path of the "
            "project's venv interpreter (e.g. /path/to/megatron-internvl/.venv/bin/python)"
        )


def check_job_name(name: str) -> None:
    if not _SLURM_NAME.fullmatch(name):
        raise LaunchError(f"name={name!r}: a Slurm job needs letters, digits, _ . - only")


def check_sbatch_path(path: Path) -> None:
    """A path on a #SBATCH line: sbatch splits those lines itself, so no blanks or quotes."""
    if re.search(r"[\s'\"\\$`%]", str(path)):
        raise LaunchError(
            f"{path}: an #SBATCH line cannot hold this path (blank, quote, $, backtick or %); "
            "choose an output_dir without them"
        )


def absolute_overrides(overrides: list[str], run_dir: Path) -> list[str]:
    """The overrides with output_dir made absolute (the job may start elsewhere)."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith("output_dir=")]
    return [*kept, f"output_dir={run_dir.parent}"]


def _sbatch_lines(name: str, run_dir: Path, cluster: ClusterConfig) -> list[str]:
    check_job_name(name)
    check_sbatch_path(run_dir)
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
    optional = {
        "gpus-per-node": cluster.gpus_per_node or None,
        "partition": cluster.partition,
        "account": cluster.account,
        "cpus-per-task": cluster.cpus_per_task,
        "mem": cluster.mem,
    }
    sbatch += [f"#SBATCH --{key}={value}" for key, value in optional.items() if value is not None]
    if cluster.exclusive:
        sbatch.append("#SBATCH --exclusive")
    return sbatch


def _master_addr(interface: str | None) -> str:
    """Shell for the rendezvous address; the batch script runs on the allocation's first node."""
    if interface is None:
        return '$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)'
    show = f"ip -4 -o addr show dev {shlex.quote(interface)}"
    return f"$({show} | awk '{{print $4}}' | cut -d/ -f1 | head -n 1)"


def render(
    name: str, run_dir: Path, overrides: list[str], cluster: ClusterConfig, layout_text: str
) -> str:
    """The sbatch script for `overrides` (the same Hydra overrides `train` takes). Every value
    that reaches the shell is quoted; those on #SBATCH lines are checked to be plain."""
    run_dir = Path(run_dir).resolve()
    sbatch = _sbatch_lines(name, run_dir, cluster)
    env = dict(DEFAULT_ENV if cluster.gpus_per_node else {"OMP_NUM_THREADS": "1"})
    if cluster.interface:
        env |= {"NCCL_SOCKET_IFNAME": cluster.interface, "GLOO_SOCKET_IFNAME": cluster.interface}
    env |= cluster.env
    srun = ["srun", "--kill-on-bad-exit=1", "--label"]
    if cluster.container == "pyxis":
        workdir = cluster.container_workdir or str(PROJECT_ROOT)
        srun += [f"--container-image={cluster.container_image}", f"--container-workdir={workdir}"]
        if cluster.container_mounts:
            srun.append(f"--container-mounts={','.join(cluster.container_mounts)}")
    command = [cluster.python, "-m", "megatron_internvl.launch.task", *overrides]
    return string.Template(TEMPLATE.read_text()).substitute(
        sbatch="\n".join(sbatch),
        layout=" ".join(layout_text.split()),
        run_dir=shlex.quote(str(run_dir)),
        master_addr=_master_addr(cluster.interface),
        env="\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
        srun=" ".join(shlex.quote(a) for a in srun),
        command=" ".join(shlex.quote(c) for c in command),
        requeue_code=REQUEUE_EXIT_CODE,
        max_requeues=int(cluster.max_requeues),
    )


def submit(script: str, path: Path) -> str:
    """Write the script and sbatch it; returns sbatch's answer (the job id line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    result = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise LaunchError(f"sbatch {path} failed: {result.stderr.strip()}")
    return result.stdout.strip()
