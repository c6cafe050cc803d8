"""all_gather_dim0 has a correct backward on gloo, where torch's autograd all_gather does not."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from megatron_internvl.parallel.collectives import all_gather_dim0
from tests.harness import run_on_ranks


def _gather_grads() -> dict:
    """Gradient of sum(W * gather(x).T) w.r.t. x: a transposed, non-contiguous incoming grad.

    Every rank's loss uses every rank's rows, so the correct gradient of the summed losses
    w.r.t. this rank's x is world * (our rows of W.T).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    weight = torch.arange(3 * 4 * world, dtype=torch.float32).reshape(3, 4 * world)
    grads = {"expected": world * weight.t().chunk(world)[rank]}
    gathers = {
        "ours": lambda x: all_gather_dim0(x, dist.group.WORLD),
        "torch": lambda x: torch.cat(dist_nn.all_gather(x), dim=0),
    }
    for name, gather in gathers.items():
        x = torch.randn(4, 3, requires_grad=True)
        (gather(x).t() * weight).sum().backward()
        grads[name] = x.grad
    return grads


def test_backward_sums_over_ranks_and_torch_gather_does_not():
    results = run_on_ranks(_gather_grads, 2)
    for result in results:
        torch.testing.assert_close(result["ours"], result["expected"])
    torch_wrong = any(not torch.allclose(r["torch"], r["expected"], atol=1e-4) for r in results)
    assert torch_wrong, "torch's all_gather backward is now right on gloo: retire ours"
