"""Which parts of InternVL train in each stage of the InternVL 2.5 recipe.

Freezing happens before the model is wrapped in DDP and handed to the optimizer: Megatron's DDP
allocates gradient buffers and the optimizer allocates state only for parameters that require
grad, so frozen parts cost neither gradient memory nor optimizer state. Activations still flow
backward through a frozen LLM to reach the projector and ViT.
"""

from __future__ import annotations

import torch

# Stage -> the InternVLModel sub-modules that train (the rest is frozen).
TRAINABLE_PARTS: dict[str, tuple[str, ...]] = {
    "1": ("vision_projection",),  # MLP warm-up
    "1.5": ("vision_model", "vision_projection"),  # ViT incremental learning
    "2": ("vision_model", "vision_projection", "language_model"),  # full instruction tuning
}


def freeze_for_stage(chunks: list[torch.nn.Module], stage: str) -> dict[str, int]:
    """Set requires_grad for `stage`; return trainable and frozen parameter counts."""
    if stage not in TRAINABLE_PARTS:
        raise ValueError(f"unknown training stage {stage!r}; use one of {list(TRAINABLE_PARTS)}")
    trainable = TRAINABLE_PARTS[stage]
    counts = {"trainable": 0, "frozen": 0}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            param.requires_grad_(name.split(".", 1)[0] in trainable)
            counts["trainable" if param.requires_grad else "frozen"] += param.numel()
    return counts
