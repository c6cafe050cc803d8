"""`python -m megatron_internvl.launch.local <torchrun arguments>`: torchrun on one machine,
reachable from this machine only.

`torchrun --standalone` keeps its rendezvous store (a TCPStore in the launcher, which the ranks
also use to find each other) listening on every interface, and gloo/NCCL listen on the address
the host name resolves to: anyone who can reach the machine could join or disturb the job. Here
the store is handed a socket bound to 127.0.0.1 (TCPStore's `master_listen_fd`), and gloo and
NCCL use the loopback interface unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME say otherwise.
Multi-node runs go through Slurm (launch/slurm.py): there rank 0's store listens only on the
address the other ranks use (MASTER_ADDR, from the cluster file's `interface` when set).

When the failing ranks exited with the user-error code (2: they printed one `error:` line about
the configuration or the data), the launcher exits 2 too and adds nothing; any other failure (a
crash, a signal) keeps torchrun's report, which names the lowest failing rank and its traceback.
"""

from __future__ import annotations

import logging
import os
import signal
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


# Exit codes of ranks the launcher itself stopped after another rank had failed.
_STOPPED_BY_LAUNCHER = {-signal.SIGTERM, -signal.SIGKILL}


def _said_by_the_ranks(record: logging.LogRecord) -> bool:
    """torchrun's lines that repeat what the ranks or its failure table say: the rank it stops
    after a failure, and a first failure that is a user error (already one `error:` line)."""
    from megatron_internvl.config.cli import USER_ERROR_EXIT_CODE

    template = str(record.msg)
    if template.startswith("Sending process %s closing signal"):
        return True
    return template.startswith("failed (exitcode: %s)") and record.args[0] == USER_ERROR_EXIT_CODE


def is_user_error_exit(failures: dict[int, Any]) -> bool:
    """The first rank to fail exited with the user-error code (it printed its `error:` line);
    every other failure is the same, or a rank the launcher stopped."""
    from megatron_internvl.config.cli import USER_ERROR_EXIT_CODE

    first = min(failures.values(), key=lambda failure: failure.timestamp)
    others = {failure.exitcode for failure in failures.values()}
    return first.exitcode == USER_ERROR_EXIT_CODE and others <= {
        USER_ERROR_EXIT_CODE,
        *_STOPPED_BY_LAUNCHER,
    }


def _torchrun(argv: list[str]) -> None:
    """torchrun's `main`, less its report when the ranks stopped on a user error."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
    from torch.distributed.run import parse_args, run

    from megatron_internvl.config.cli import USER_ERROR_EXIT_CODE

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        lambda log_record: not _said_by_the_ranks(log_record)
    )

    @record  # a crash: the lowest failing rank's error file and torchrun's failure table
    def launch() -> None:
        try:
            run(parse_args(argv))
        except ChildFailedError as failed:
            if is_user_error_exit(failed.failures):  # the ranks have said what is wrong
                raise SystemExit(USER_ERROR_EXIT_CODE) from None
            raise

    launch()


def main(argv: list[str] | None = None) -> int:
    install()
    _torchrun(list(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
