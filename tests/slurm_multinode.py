"""A real multi-node Slurm cluster on this machine, for the launcher's multi-node tests.

Each node is a Linux network namespace with its own address on a private bridge and its own
slurmd, started in a private mount + UTS namespace: its hostname is the node name and a private
/etc/hosts names every node, so a rendezvous by host name works as on a cluster. One slurmctld
and one private munged run on the host. The settings make scheduling and node-failure detection
fast (a lost node is declared down after ~10 s). `lose_node` kills a node as a power cut does:
its link goes dark first (no FIN/RST reaches the others), then every process in it dies.

Built on the one-node cluster's configuration (tests/slurm_cluster.py). Skips where namespaces
cannot be made (not root, no `ip`/`nsenter`/`unshare`) or the Slurm daemons are absent. Every
daemon, namespace, veth and the bridge is removed at the end, also when setting up fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.slurm_cluster import _conf as one_node_conf

NODES = ("n1", "n2")
CPUS_PER_NODE = 2
_NODE_MEMORY_MB = 2000


def _run(*command: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


def _why_not() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    missing = [
        tool
        for tool in ("slurmctld", "slurmd", "munged", "ip", "nsenter", "unshare", "mount")
        if not shutil.which(tool)
    ]
    if missing:
        return f"missing {missing} (apt-get install slurmctld slurmd munge iproute2 util-linux)"
    if os.geteuid() != 0:
        return "the multi-node Slurm cluster needs root (network namespaces, daemons)"
    probe = f"mvlprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create network namespaces here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that no interface of this host is on."""
    used = _run("ip", "-o", "-4", "addr", "show")
    for third in range(os.getpid() % 200, 256):
        net = ipaddress.IPv4Network(f"10.213.{third}.0/24")
        if f"10.213.{third}." not in used:
            return net
    raise RuntimeError("no free 10.213.x.0/24 subnet for the test cluster")


def _stop(pid: int, wait: float = 10) -> None:
    """SIGTERM, then SIGKILL if it is still alive after `wait` seconds."""
    try:
        proc = psutil.Process(pid)
        proc.terminate()
        proc.wait(wait)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        proc.kill()


def _stop_pidfile(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        _stop(int(path.read_text().strip()))


@dataclass
class MultiNodeCluster:
    """The running cluster: `env` for Slurm's clients; node names, addresses, controls."""

    root: Path
    env: dict[str, str]
    nodes: tuple[str, ...]
    addresses: dict[str, str]
    prefix: str  # of the namespace / veth names

    def namespace(self, node: str) -> str:
        return f"{self.prefix}{node}"

    def veth(self, node: str) -> str:
        return f"{self.prefix}v{node[1:]}"

    def slurmd_log(self, node: str) -> str:
        path = self.root / f"slurmd-{node}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def start_slurmd(self, node: str) -> None:
        """slurmd of `node` in its namespace, with the node's hostname and /etc/hosts."""
        script = 'mount --bind "$1" /etc/hosts && hostname "$2" && exec slurmd -N "$2" -f "$3"'
        _run(
            *("nsenter", f"--net=/run/netns/{self.namespace(node)}"),
            *("unshare", "--mount", "--uts", "--propagation", "private"),
            *("sh", "-c", script, "sh", str(self.root / "hosts"), node, self.env["SLURM_CONF"]),
            env=self.env,
        )

    def kill_processes_in(self, node: str) -> None:
        """SIGKILL every process in the node's namespace until none is left."""
        for _ in range(50):
            pids = _run("ip", "netns", "pids", self.namespace(node)).split()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.2)
        raise RuntimeError(f"processes of node {node} survive SIGKILL")

    def lose_node(self, node: str) -> None:
        """As a power cut: the link goes dark first, then slurmd and every task dies."""
        _run("ip", "link", "set", self.veth(node), "down")
        self.kill_processes_in(node)

    def return_node(self, node: str) -> None:
        """Link up, slurmd started again, node returned to service."""
        _run("ip", "link", "set", self.veth(node), "up")
        self.start_slurmd(node)
        self.wait_idle([node])

    def node_states(self) -> dict[str, str]:
        out = _run("sinfo", "-h", "-N", "-o", "%N %T", env=self.env)
        return dict(line.split() for line in out.splitlines() if line.strip())

    def wait_idle(self, nodes: list[str] | None = None, timeout: float = 60) -> None:
        nodes = nodes or list(self.nodes)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.node_states()
            if all(states.get(node) == "idle" for node in nodes):
                return
            for node in nodes:  # a node back from a failure: return it now (no 25-46 s wait)
                if states.get(node, "").startswith("down"):
                    subprocess.run(
                        ["scontrol", "update", f"nodename={node}", "state=resume"],
                        env=self.env,
                        capture_output=True,
                    )
            time.sleep(1)
        raise RuntimeError(f"nodes never became idle ({self.node_states()}); see {self.root}")

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, Reason, NodeList, ...)."""
        out = _run("scontrol", "show", "job", "-o", job_id, env=self.env)
        return dict(field.split("=", 1) for field in out.split() if "=" in field)


def _conf(root: Path, addresses: dict[str, str], controller: str) -> str:
    """The one-node cluster's configuration, with one line per namespace node, per-node daemon
    files, a private munge socket and fast scheduling and failure detection."""
    host = socket.gethostname().split(".")[0]
    lines = [
        line
        for line in one_node_conf(root).splitlines()
        if line.strip() and not line.startswith(("NodeName=", "PartitionName=", "#"))
    ]
    settings = dict(line.split("=", 1) for line in lines)
    settings.update(
        SlurmctldHost=f"{host}({controller})",
        AuthInfo=f"socket={root}/munge.sock,cred_expire=10",  # requeue hold: 11 s, not 121
        SlurmdSpoolDir=f"{root}/spool/%n",
        SlurmdPidFile=f"{root}/slurmd-%n.pid",
        SlurmdLogFile=f"{root}/slurmd-%n.log",
        SlurmdTimeout="10",
        SlurmctldTimeout="30",
        MessageTimeout="5",
        KillWait="3",
        SlurmdDebug="debug",  # the nodes log each signal delivered to a step
        SchedulerParameters="batch_sched_delay=0,sched_min_interval=0,bf_interval=1",
        ReturnToService="2",
        JobRequeue="1",
    )
    text = "".join(f"{key}={value}\n" for key, value in settings.items())
    for node, address in addresses.items():
        text += (
            f"NodeName={node} NodeAddr={address} NodeHostname={node} CPUs={CPUS_PER_NODE} "
            f"RealMemory={_NODE_MEMORY_MB} State=UNKNOWN\n"
        )
    return text + "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"


def _network(stack: contextlib.ExitStack, prefix: str, nodes: tuple[str, ...]) -> dict[str, str]:
    """A bridge with the controller's address, one namespace + veth per node; addresses."""
    net = _free_subnet()
    bridge = f"{prefix}br"
    _run("ip", "link", "add", bridge, "type", "bridge")
    stack.callback(subprocess.run, ["ip", "link", "del", bridge], capture_output=True)
    _run("ip", "addr", "add", f"{net[1]}/{net.prefixlen}", "dev", bridge)
    _run("ip", "link", "set", bridge, "up")
    addresses = {"controller": str(net[1])}
    for index, node in enumerate(nodes, start=1):
        ns, veth, peer = f"{prefix}{node}", f"{prefix}v{index}", f"{prefix}p{index}"
        _run("ip", "netns", "add", ns)
        stack.callback(subprocess.run, ["ip", "netns", "del", ns], capture_output=True)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer, "netns", ns)
        stack.callback(subprocess.run, ["ip", "link", "del", veth], capture_output=True)
        _run("ip", "link", "set", veth, "master", bridge, "up")
        addresses[node] = str(net[10 + index])
        _run("ip", "-n", ns, "addr", "add", f"{addresses[node]}/{net.prefixlen}", "dev", peer)
        _run("ip", "-n", ns, "link", "set", peer, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
    return addresses


def _munged(stack: contextlib.ExitStack, root: Path) -> None:
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    _run(
        "munged",
        "--force",
        f"--socket={root}/munge.sock",
        f"--key-file={key}",
        f"--pid-file={root}/munged.pid",
        f"--log-file={root}/munged.log",
        f"--seed-file={root}/munged.seed",
    )
    stack.callback(_stop_pidfile, root / "munged.pid")


@contextlib.contextmanager
def multinode_cluster(root: Path, nodes: tuple[str, ...] = NODES) -> Iterator[MultiNodeCluster]:
    """Start the cluster under `root`; everything is stopped and removed on exit."""
    prefix = f"mvl{os.getpid() % 100000}"
    with contextlib.ExitStack() as stack:
        addresses = _network(stack, prefix, nodes)
        controller = addresses.pop("controller")
        host = socket.gethostname().split(".")[0]
        (root / "hosts").write_text(
            f"127.0.0.1 localhost\n{controller} {host}\n"
            + "".join(f"{address} {node}\n" for node, address in addresses.items())
        )
        (root / "state").mkdir()
        for node in nodes:
            (root / "spool" / node).mkdir(parents=True)
        conf = root / "slurm.conf"
        conf.write_text(_conf(root, addresses, controller))
        env = {**os.environ, "SLURM_CONF": str(conf)}
        cluster = MultiNodeCluster(root, env, nodes, addresses, prefix)
        _munged(stack, root)
        _run("slurmctld", "-f", str(conf), env=env)
        stack.callback(_stop_pidfile, root / "slurmctld.pid")
        for node in nodes:  # LIFO: runs before the namespaces are deleted
            stack.callback(cluster.kill_processes_in, node)
        stack.callback(
            subprocess.run, ["scancel", "--full", "--user=root"], env=env, capture_output=True
        )
        for node in nodes:
            cluster.start_slurmd(node)
        cluster.wait_idle()
        yield cluster


@pytest.fixture(scope="module")
def slurm_multinode(tmp_path_factory) -> Iterator[MultiNodeCluster]:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    with multinode_cluster(tmp_path_factory.mktemp("slurm_multinode")) as cluster:
        yield cluster
