"""Parameter counts of a flavour, from the Megatron model built on the meta device."""

from __future__ import annotations

import torch

from megatron_internvl.models.internvl import build_internvl_chunks
from megatron_internvl.models.registry import InternVLSpec
from megatron_internvl.parallel.layout import ParallelLayout

# Top-level module of InternVLModel -> the part it belongs to.
_PARTS = {"vision_model": "vision", "vision_projection": "projector", "language_model": "language"}
# Language-model parameters that are embeddings (input embedding, untied output layer).
_EMBEDDINGS = ("language_model.embedding.", "language_model.output_layer.")


def _named_sizes(spec: InternVLSpec, max_sequence_length: int) -> list[tuple[str, int]]:
    """(name, numel) of every parameter, the vocabulary padding's rows left out (masked, never
    trained: not part of the model); allocates nothing: parameters live on the meta device and
    are never initialized. Needs Megatron's process groups (`runtime.single_process()`)."""
    with torch.device("meta"):
        [model] = build_internvl_chunks(
            spec, ParallelLayout(), max_sequence_length, perform_initialization=False
        )
    padded, vocab = spec.language.padded_vocab_size, spec.language.vocab_size

    def size(name: str, param: torch.Tensor) -> int:
        if name.startswith(_EMBEDDINGS) and param.size(0) == padded:
            return param.numel() // padded * vocab
        return param.numel()

    return [(name, size(name, param)) for name, param in model.named_parameters()]


def parameter_counts(spec: InternVLSpec, max_sequence_length: int = 4096) -> dict[str, int]:
    """Vision / projector / language / total parameters (unpadded vocabulary, TP=1)."""
    counts = dict.fromkeys(_PARTS.values(), 0)
    for name, size in _named_sizes(spec, max_sequence_length):
        counts[_PARTS[name.split(".", 1)[0]]] += size
    counts["total"] = sum(counts.values())
    return counts


def scaling_parameter_counts(spec: InternVLSpec) -> dict[str, int]:
    """The counts scaling laws use: `language` WITHOUT its embeddings, `language_embedding`
    (input embedding + untied output layer), `non_embedding` N = vision + projector + language,
    and `total` (embeddings cost little compute and distort small-model fits)."""
    counts = dict.fromkeys(("vision", "projector", "language", "language_embedding"), 0)
    for name, size in _named_sizes(spec, 4096):
        part = "language_embedding" if name.startswith(_EMBEDDINGS) else None
        counts[part or _PARTS[name.split(".", 1)[0]]] += size
    counts["non_embedding"] = counts["vision"] + counts["projector"] + counts["language"]
    counts["total"] = counts["non_embedding"] + counts["language_embedding"]
    return counts
