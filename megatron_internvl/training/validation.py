"""Validation loss: the held-out set (`data.valid_shards`) through the model in eval mode.

The loss is sum(w * CE) / sum(w) over every supervised token of the whole set, with the
training loss weights `w` (`data.loss_reduction`): each sample's tokens count wherever the
packer put it, and every sample is read once (data-parallel rank r of n reads samples r, r + n,
... in file order), so the value is the same at every parallel layout. Each evaluation reads the
set from its start, in groups of the training step's micro-batch count (one forward-only
schedule per group); model-parallel ranks of one data-parallel rank read the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func


class ValidationSet:
    """A held-out loader that can be evaluated repeatedly from its start."""

    def __init__(self, loader: Any, microbatches_per_step: int, max_steps: int | None) -> None:
        self.loader = loader
        self.start = loader.state_dict()
        self.group = microbatches_per_step
        self.max_microbatches = None if max_steps is None else max_steps * microbatches_per_step

    def close(self) -> None:
        """Close the held-out loader's files and decoders."""
        self.loader.close()

    def microbatch_groups(self) -> Iterator[list[dict[str, Any]]]:
        """Groups of up to one step's micro-batches, from the start of the set."""
        self.loader.load_state_dict(self.start)
        left = self.max_microbatches
        while left is None or left > 0:
            size = self.group if left is None else min(self.group, left)
            group = [batch for _, batch in zip(range(size), self.loader, strict=False)]
            if not group:
                return
            if left is not None:
                left -= len(group)
            yield group

    def evaluate(
        self,
        forward_step: Callable[..., Any],
        model: list[torch.nn.Module],
        seq_length: int,
    ) -> float | None:
        """Token-weighted mean loss over the set (None if it holds no supervised token)."""
        modes = [(module, module.training) for chunk in model for module in chunk.modules()]
        for chunk in model:
            chunk.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=torch.cuda.current_device())
        try:
            with torch.no_grad():
                for group in self.microbatch_groups():
                    totals += _forward_only(forward_step, model, group, seq_length)
        finally:
            for module, training in modes:
                module.train(training)
        torch.distributed.all_reduce(
            totals, group=parallel_state.get_pipeline_model_parallel_group()
        )
        torch.distributed.all_reduce(
            totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
        totals = totals.cpu()
        return float(totals[0] / totals[1]) if totals[1] > 0 else None


def _forward_only(
    forward_step: Callable[..., Any],
    model: list[torch.nn.Module],
    group: list[dict[str, Any]],
    seq_length: int,
) -> torch.Tensor:
    """(sum of w * CE, sum of w) of one group of micro-batches, on the last pipeline stage."""
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(group) for _ in model] if len(model) > 1 else iter(group),
        model=model,
        num_microbatches=len(group),
        seq_length=seq_length,
        micro_batch_size=1,
        forward_only=True,
    )
    totals = torch.zeros(2, dtype=torch.float64, device=torch.cuda.current_device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for report in reports:
            totals += report["lm loss"].double()
    return totals
