"""The parallel layout (TP x CP x PP x DP) of a run: validated once, handed to Megatron-Core."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_internvl.parallel import vision_groups


@dataclass(frozen=True)
class ParallelLayout:
    """How the world's ranks are split. The data-parallel size is what the world leaves over."""

    tensor: int = 1
    """Tensor-parallel size: attention heads and MLP columns are split across this many ranks."""
    pipeline: int = 1
    """Pipeline-parallel size: the layer stack is cut into this many stages."""
    virtual_pipeline: int | None = None
    """Model chunks per pipeline rank for the interleaved 1F1B schedule (None: plain 1F1B)."""
    context: int = 1
    """Context-parallel size: each sequence is split across this many ranks (load-balanced)."""
    sequence_parallel: bool = False
    """Shard activations outside attention/MLP along the sequence over the TP group (needs TP>1)."""
    vision_tensor: int | None = None
    """Tensor-parallel size of the ViT and projector (divides `tensor`; None: `tensor`). Below
    `tensor`, each LLM TP group splits a micro-batch's tiles over tensor/vision_tensor ViT
    replicas (see parallel/vision_groups.py)."""

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel layout: {name}={getattr(self, name)} must be >= 1")
        if self.virtual_pipeline is not None and (self.virtual_pipeline < 2 or self.pipeline < 2):
            raise ValueError(
                f"parallel layout: virtual_pipeline={self.virtual_pipeline} needs pipeline >= 2 "
                "and virtual_pipeline >= 2; set virtual_pipeline=None for plain 1F1B"
            )
        if self.vision_tensor is not None and (
            self.vision_tensor < 1 or self.tensor % self.vision_tensor
        ):
            divisors = [d for d in range(1, self.tensor + 1) if self.tensor % d == 0]
            raise ValueError(
                f"parallel layout: vision_tensor={self.vision_tensor} must divide "
                f"tensor={self.tensor}; use one of {divisors}"
            )
        if self.sequence_parallel and self.tensor == 1:
            raise ValueError(
                "parallel layout: sequence_parallel=True needs tensor > 1; set "
                "sequence_parallel=False or raise tensor"
            )

    @property
    def vision_tensor_size(self) -> int:
        """The ViT's tensor-parallel size (the LLM's unless `vision_tensor` says otherwise)."""
        return self.vision_tensor or self.tensor

    @property
    def vision_replicas(self) -> int:
        """ViT replicas inside one LLM TP group, each encoding its share of the tiles."""
        return self.tensor // self.vision_tensor_size

    @property
    def model_parallel(self) -> int:
        """Ranks that hold one replica of the model."""
        return self.tensor * self.pipeline * self.context

    def data_parallel(self, world_size: int) -> int:
        """The data-parallel size this layout leaves on `world_size` ranks."""
        if world_size % self.model_parallel:
            divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
            raise ValueError(
                f"parallel layout: tensor x pipeline x context = {self.tensor} x {self.pipeline} "
                f"x {self.context} = {self.model_parallel} does not divide the world size "
                f"{world_size}; choose a product in {divisors}"
            )
        return world_size // self.model_parallel

    def initialize(self) -> None:
        """Create Megatron-Core's process groups for this layout on the initialized world."""
        self.data_parallel(dist.get_world_size())
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=self.tensor,
            pipeline_model_parallel_size=self.pipeline,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline,
            context_parallel_size=self.context,
        )
        vision_groups.initialize(self.vision_tensor_size)

    def __str__(self) -> str:
        parts = [f"tp{self.tensor}", f"pp{self.pipeline}", f"cp{self.context}"]
        if self.virtual_pipeline:
            parts.append(f"vpp{self.virtual_pipeline}")
        if self.sequence_parallel:
            parts.append("sp")
        if self.vision_tensor_size != self.tensor:
            parts.append(f"vtp{self.vision_tensor_size}")
        return "-".join(parts)
