"""Run a function on N CPU ranks (gloo) and collect what each rank returns.

Spawning costs seconds (importing Megatron-Core), so a test should check many things in one
spawn. Each rank runs with the CPU platform installed, one intra-op thread, and
`MASTER_ADDR`/`MASTER_PORT`/`RANK`/`WORLD_SIZE` set as torchrun would. The ranks meet through a
FileStore in a private temporary directory and gloo talks over the loopback interface, so
nothing listens beyond this machine. A rank's return value travels back through `torch.save`,
so tensors are fine.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch


class RankError(AssertionError):
    """One or more ranks raised, died or timed out; the message holds every rank's story."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    store_file: str,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    results: mp.Queue,
    timeout_s: float,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        GLOO_SOCKET_IFNAME="lo",
    )
    try:
        torch.set_num_threads(1)
        from megatron_internvl.parallel import cpu_platform

        cpu_platform.install()
        torch.distributed.init_process_group(
            "gloo",
            init_method=f"file://{store_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        value = fn(*args, **kwargs)
        results.put((rank, "ok", _to_bytes(value)))
    except BaseException:  # report everything, including assertion errors and exits
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            torch.distributed.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    **kwargs: Any,
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` spawned gloo ranks; return results by rank.

    `fn` must be importable (module level). Raises `RankError` with every failing rank's
    traceback if any rank raises, exits without reporting, or the run passes `timeout_s`.
    """
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    port = free_port()
    store_dir = tempfile.mkdtemp(prefix="harness-store-")
    store_file = os.path.join(store_dir, "store")
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, world_size, port, store_file, fn, args, kwargs, results, timeout_s),
            name=f"rank{rank}",
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()

    reports: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    grace_deadline: float | None = None  # after a failure, wait briefly for the other ranks
    try:
        while len(reports) < world_size:
            now = time.monotonic()
            limit = min(deadline, grace_deadline or deadline)
            if now >= limit:
                break
            try:
                rank, status, payload = results.get(timeout=min(0.5, limit - now))
                reports[rank] = (status, payload)
                if status == "error" and grace_deadline is None:
                    grace_deadline = time.monotonic() + 10.0
            except queue.Empty:
                dead = [
                    p for r, p in enumerate(procs) if r not in reports and p.exitcode is not None
                ]
                if dead and grace_deadline is None:
                    grace_deadline = time.monotonic() + 5.0
    finally:
        for proc in procs:
            proc.join(timeout=5)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        shutil.rmtree(store_dir, ignore_errors=True)

    failures = []
    for rank, proc in enumerate(procs):
        status, payload = reports.get(rank, ("missing", None))
        if status == "error":
            failures.append(f"--- rank {rank} raised:\n{payload}")
        elif status == "missing":
            why = (
                f"exited with code {proc.exitcode} without reporting"
                if time.monotonic() < deadline
                else f"no report within {timeout_s:.0f} s (timed out)"
            )
            failures.append(f"--- rank {rank} {why}")
    if failures:
        name = getattr(fn, "__qualname__", repr(fn))
        raise RankError(f"{name} on {world_size} ranks failed:\n" + "\n".join(failures))
    return [torch.load(io.BytesIO(reports[r][1]), weights_only=False) for r in range(world_size)]
