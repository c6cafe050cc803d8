"""The CPU-rank harness returns every rank's result and reports every failure clearly."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_internvl.parallel import cpu_platform
from tests.harness import RankError, run_on_ranks


def _rank_facts(scale: float) -> dict:
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "sum": value * scale,
        "backend": dist.get_backend(),
        "platform": cpu_platform.is_active(),
        "threads": torch.get_num_threads(),
        "env_rank": os.environ["RANK"],
    }


def _fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise ValueError("bad shard on rank one")
    dist.barrier()  # rank 0 would hang here without the harness's grace period


def _hang_on_rank_one() -> None:
    if dist.get_rank() == 1:
        time.sleep(120)


def test_results_come_back_per_rank_with_tensors():
    results = run_on_ranks(_rank_facts, 3, 2.0)
    assert [r["rank"] for r in results] == [0, 1, 2]
    for r in results:
        assert r["world"] == 3 and r["backend"] == "gloo" and r["platform"]
        assert r["threads"] == 1 and r["env_rank"] == str(r["rank"])
        torch.testing.assert_close(r["sum"], torch.tensor([12.0]))


def test_a_failing_rank_is_reported_with_its_traceback():
    with pytest.raises(RankError) as caught:
        run_on_ranks(_fail_on_rank_one, 2, timeout_s=60)
    message = str(caught.value)
    assert "rank 1 raised" in message and "ValueError: bad shard on rank one" in message
    assert "_fail_on_rank_one on 2 ranks failed" in message


def test_a_hanging_rank_times_out():
    start = time.monotonic()
    with pytest.raises(RankError, match="rank 1 no report within 15 s"):
        run_on_ranks(_hang_on_rank_one, 2, timeout_s=15)
    assert time.monotonic() - start < 60
