"""Rank-side helpers that compare a parallel layout against a one-rank reference.

Full (unsharded) tensors are gathered through Megatron's own dist_checkpointing: a layout saves
its weights or gradients as a sharded checkpoint and a TP=1/PP=1 model loads it back. So any
TP/PP/VPP/CP layout can be compared against a plain model, parameter by parameter.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_internvl.parallel.layout import ParallelLayout


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


def sharded_state(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    return {f"chunk{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_sharded(chunks: list[torch.nn.Module], path: Path, tensors: str = "param") -> None:
    """Save the chunks' parameters (or their `main_grad`s, if tensors="grad") as a checkpoint."""
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    swapped = []
    if tensors == "grad":
        for chunk in chunks:
            for param in chunk.parameters():
                swapped.append((param, param.data))
                param.data = param.main_grad.detach().clone()
    try:
        dist_checkpointing.save(sharded_state(chunks), str(path))
    finally:
        for param, data in swapped:
            param.data = data
    dist.barrier()


def load_sharded(chunks: list[torch.nn.Module], path: Path) -> None:
    """Load a checkpoint (saved at any layout) into the chunks of the current layout."""
    loaded = dist_checkpointing.load(sharded_state(chunks), str(path))
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded[f"chunk{i}"], strict=False)


def full_named(chunks: list[torch.nn.Module], grads: bool = False) -> dict[str, torch.Tensor]:
    """Parameters (or main_grads) of a TP=1/PP=1 model, by name, detached clones."""
    out = {}
    for i, chunk in enumerate(chunks):
        for name, param in unwrap(chunk).named_parameters():
            value = param.main_grad if grads else param.data
            out[f"{i}.{name}"] = value.detach().clone()
    return out


def use_layout(layout: ParallelLayout, seed: int = 1234) -> None:
    """(Re)create the process groups for `layout` and seed every RNG the same way."""
    parallel_state.destroy_model_parallel()
    layout.initialize()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def layout_batches(
    global_batch: list[dict[str, torch.Tensor]], layout: ParallelLayout
) -> list[dict[str, torch.Tensor]]:
    """The microbatches this rank's data-parallel replica consumes (a contiguous slice)."""
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    if len(global_batch) % dp:
        raise ValueError(f"{len(global_batch)} microbatches do not split over {dp} DP ranks")
    per_rank = len(global_batch) // dp
    return global_batch[rank * per_rank : (rank + 1) * per_rank]


def data_iterators(
    microbatches: list[dict[str, torch.Tensor]], n_chunks: int
) -> Iterator[Any] | list[Iterator[Any]]:
    """One iterator per model chunk (the interleaved schedule wants a list)."""
    if n_chunks == 1:
        return iter(microbatches)
    return [iter(microbatches) for _ in range(n_chunks)]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-name max |a - b|; a key missing on either side is an error."""
    if a.keys() != b.keys():
        raise AssertionError(f"parameter names differ: {sorted(a.keys() ^ b.keys())}")
    return {k: float((a[k] - b[k]).abs().max()) for k in a}


def compare_layouts(
    tmp: Path,
    build: Callable[[ParallelLayout], list[torch.nn.Module]],
    step: Callable[[list[torch.nn.Module], ParallelLayout], float],
    layouts: list[ParallelLayout],
    reference: ParallelLayout | None = None,
) -> dict[str, Any]:
    """Loss and per-parameter max gradient difference of each layout against `reference`.

    `build(layout)` returns this rank's (DDP-wrapped) chunks; `step(chunks, layout)` runs one
    forward/backward over this rank's share of a fixed global batch and returns the loss. All
    layouts start from the reference's weights.
    """
    reference = reference or ParallelLayout()
    use_layout(reference)
    ref_chunks = build(reference)
    save_sharded(ref_chunks, tmp / "weights")
    report: dict[str, Any] = {"reference_loss": step(ref_chunks, reference)}
    ref_grads = full_named(ref_chunks, grads=True)
    report["reference_grad_scale"] = max(float(g.abs().max()) for g in ref_grads.values())
    for layout in layouts:
        use_layout(layout)
        chunks = build(layout)
        load_sharded(chunks, tmp / "weights")
        loss = step(chunks, layout)
        save_sharded(chunks, tmp / f"grads-{layout}", tensors="grad")

        use_layout(reference)
        gathered = build(reference)
        load_sharded(gathered, tmp / f"grads-{layout}")
        diffs = max_abs_diff(full_named(gathered), ref_grads)
        report[str(layout)] = {"loss": loss, "grad_diff": max(diffs.values()), "diffs": diffs}
    return report


def compare_optimizer_step(
    tmp: Path,
    build: Callable[[ParallelLayout, bool], list[torch.nn.Module]],
    step: Callable[[list[torch.nn.Module], ParallelLayout], float],
    layout: ParallelLayout,
    optimizer_config: OptimizerConfig,
) -> dict[str, Any]:
    """One optimizer step with the distributed optimizer at `layout` vs the plain optimizer on
    one rank's layout: loss, grad norm, and how far the stepped parameters are apart.

    `build(layout, use_distributed_optimizer)` returns DDP-wrapped chunks.
    """
    reference = ParallelLayout()
    use_layout(reference)
    initial_chunks = build(reference, False)
    initial = full_named(initial_chunks)
    save_sharded(initial_chunks, tmp / "weights")

    def run(at: ParallelLayout, distributed: bool):
        use_layout(at)
        chunks = build(at, distributed)
        load_sharded(chunks, tmp / "weights")
        config = dataclasses.replace(optimizer_config, use_distributed_optimizer=distributed)
        optimizer = get_megatron_optimizer(config, chunks)
        optimizer.zero_grad()
        loss = step(chunks, at)
        ok, grad_norm, _ = optimizer.step()
        assert ok, "optimizer step was skipped"
        return chunks, loss, float(grad_norm)

    ref_chunks, ref_loss, ref_norm = run(reference, False)
    ref_params = full_named(ref_chunks)
    chunks, loss, norm = run(layout, True)
    save_sharded(chunks, tmp / "stepped")
    use_layout(reference)
    gathered = build(reference, False)
    load_sharded(gathered, tmp / "stepped")
    diffs = max_abs_diff(full_named(gathered), ref_params)
    return {
        "reference_loss": ref_loss,
        "loss": loss,
        "reference_grad_norm": ref_norm,
        "grad_norm": norm,
        "param_diff": max(diffs.values()),
        "update_size": max(float((ref_params[k] - v).abs().max()) for k, v in initial.items()),
    }
