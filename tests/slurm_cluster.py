"""A real one-node Slurm cluster (Debian's slurmctld + slurmd + munge) for the launcher tests.

Started per test module in a temporary directory, as root, on this host; stopped with its jobs
and daemons at the end. Skips when the Slurm daemons are not installed (.ci/run installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.harness import free_port


def _conf(root: Path) -> str:
    host = socket.gethostname().split(".")[0]
    memory_mb = psutil.virtual_memory().total // 2**20 // 2
    return f"""\
ClusterName=ci
SlurmctldHost={host}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ReturnToService=2
MpiDefault=none
JobRequeue=1
NodeName={host} CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _kill_pidfile(path: Path) -> None:
    if path.is_file():
        try:
            os.kill(int(path.read_text().strip()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory) -> Iterator[dict[str, str]]:
    if not (shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged")):
        pytest.skip("Slurm daemons not installed (apt-get install slurmctld slurmd munge)")
    if os.geteuid() != 0:
        pytest.skip("the one-node Slurm cluster runs as root")
    root = tmp_path_factory.mktemp("slurm")
    (root / "state").mkdir()
    (root / "spool").mkdir()
    conf = root / "slurm.conf"
    conf.write_text(_conf(root))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    # Our own munged on the default socket unless one serves it already (another munged on a
    # private socket does not count); stopped by its pid file, never by name.
    munge_pid = root / "munged.pid"
    started_munge = not Path("/run/munge/munge.socket.2").exists()
    if started_munge:
        subprocess.run(["munged", "--force", f"--pid-file={munge_pid}"], check=True)
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True
            ).stdout.strip()
            if state == "idle":
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"Slurm node never became idle ({state!r}); see {root}/*.log")
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
        time.sleep(1)
        _kill_pidfile(root / "slurmd.pid")
        _kill_pidfile(root / "slurmctld.pid")
        if started_munge:
            _kill_pidfile(munge_pid)
