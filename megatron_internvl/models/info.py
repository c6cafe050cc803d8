"""Parameter counts of a flavour, from the Megatron model built on the meta device."""

from __future__ import annotations

import torch

from megatron_internvl.models.internvl import build_internvl_chunks
from megatron_internvl.models.registry import InternVLSpec
from megatron_internvl.parallel.layout import ParallelLayout

# Top-level module of InternVLModel -> the part it belongs to.
_PARTS = {"vision_model": "vision", "vision_projection": "projector", "language_model": "language"}


def parameter_counts(spec: InternVLSpec, max_sequence_length: int = 4096) -> dict[str, int]:
    """Vision / projector / language / total parameters (unpadded vocabulary, TP=1).

    Needs Megatron's process groups (e.g. inside `runtime.single_process()`); allocates nothing:
    parameters live on the meta device and are never initialized.
    """
    with torch.device("meta"):
        [model] = build_internvl_chunks(
            spec, ParallelLayout(), max_sequence_length, perform_initialization=False
        )
    counts = dict.fromkeys(_PARTS.values(), 0)
    for name, param in model.named_parameters():
        counts[_PARTS[name.split(".", 1)[0]]] += param.numel()
    counts["total"] = sum(counts.values())
    return counts
