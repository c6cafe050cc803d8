"""`python -m megatron_internvl.launch.local <torchrun arguments>`: torchrun on one machine,
reachable from this machine only.

`torchrun --standalone` keeps its rendezvous store (a TCPStore in the launcher, which the ranks
also use to find each other) listening on every interface, and gloo/NCCL listen on the address
the host name resolves to: anyone who can reach the machine could join or disturb the job. Here
the store is handed a socket bound to 127.0.0.1 (TCPStore's `master_listen_fd`), and gloo and
NCCL use the loopback interface unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME say otherwise.
Multi-node runs go through Slurm (launch/slurm.py): there rank 0's store listens only on the
address the other ranks use (MASTER_ADDR, from the cluster file's `interface` when set).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

LOOPBACK = "127.0.0.1"
_LISTENING: list[socket.socket] = []  # kept open for the store's lifetime (the process's)


def _listening_socket(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(4096)
    _LISTENING.append(sock)
    return sock


def bind_stores(address: str) -> None:
    """Make every TCPStore server this process creates listen on `address` only (the launcher's
    rendezvous store, or rank 0's under `init_process_group(env://)`)."""
    import importlib

    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

    # The module (torch.distributed.rendezvous is also the name of a function in the package).
    rendezvous = importlib.import_module("torch.distributed.rendezvous")

    base = dist.TCPStore

    class BoundTCPStore(base):
        def __init__(self, host_name: str, port: int, *args: Any, **kwargs: Any) -> None:
            names = ("world_size", "is_master", "timeout", "wait_for_workers", "multi_tenant")
            kwargs.update(zip(names, args, strict=False))
            if kwargs.get("is_master") and kwargs.get("master_listen_fd") is None:
                sock = _listening_socket(address, port)
                port = sock.getsockname()[1]
                kwargs["master_listen_fd"] = sock.fileno()
                host_name = address
            super().__init__(host_name, port, **kwargs)

    dist.TCPStore = BoundTCPStore  # elastic's create_c10d_store looks it up here
    rendezvous.TCPStore = BoundTCPStore
    c10d_rendezvous_backend.TCPStore = BoundTCPStore


def install() -> None:
    """Local runs: stores on 127.0.0.1, gloo and NCCL on the loopback interface."""
    bind_stores(LOOPBACK)
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(name, "lo")


def main(argv: list[str] | None = None) -> int:
    install()
    from torch.distributed.run import main as torchrun

    torchrun(list(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
