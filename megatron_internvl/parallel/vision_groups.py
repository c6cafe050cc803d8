"""The ViT's own tensor parallelism (`parallel.vision_tensor`), smaller than the LLM's.

Each LLM TP group of T ranks (consecutive global ranks: Megatron puts TP innermost) is cut into
R = T / V vision-TP groups of V consecutive ranks. The ViT and projector are built on the vision
TP group, so their collectives stay inside it. The R groups are ViT replicas: each encodes a
contiguous share of the micro-batch's tiles (zero tiles pad the shares to equal size), and the
image tokens are all-gathered over the "replica group" (the ranks of one LLM TP group with the
same vision-TP rank) back into tile order. Every LLM TP rank consumes the whole gathered tensor
and receives its whole gradient (SP's scatter all-gathers it; without SP the first layer's
column-parallel input all-reduces it), so the gather's backward keeps its own slice.

Gradients: each replica saw other tiles, so ViT grads are summed over the replica group before
Megatron's data-parallel reduction (`finalize_model_grads`). ViT parameters that are both
replicated over vision TP and sequence-parallel are already summed over the whole LLM TP group
by Megatron (= vision TP x replicas) and are left alone. The grad norm counts TP-sharded ViT
parameters once: replicas other than the first mark theirs `shared`, which Megatron's norm skips.
Checkpoints name the ViT's shards by the vision-TP rank, with the replicas (and DP/CP ranks) as
replica ids, so they reshard between vision TP sizes like any TP change.

With V = T nothing here changes what Megatron does: the groups are Megatron's own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads as megatron_finalize_model_grads
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.utils import get_model_config


@dataclass(frozen=True)
class _Groups:
    llm_tensor: dist.ProcessGroup  # the LLM TP group these were made for (stale check)
    tensor: dist.ProcessGroup  # vision TP group
    replicas: dist.ProcessGroup | None  # same vision-TP rank in one LLM TP group; None: R=1
    checkpoint_replicas: dist.ProcessGroup  # ranks holding the same ViT shard: replica ids
    created: tuple[dist.ProcessGroup, ...]


_STATE: _Groups | None = None


def initialize(vision_tensor: int) -> None:
    """Create the vision groups for the current Megatron groups (collective over the world)."""
    global _STATE
    _destroy()
    llm_tp = parallel_state.get_tensor_model_parallel_group()
    tensor = llm_tp.size()
    if tensor % vision_tensor:
        raise ValueError(f"vision_tensor={vision_tensor} must divide tensor={tensor}")
    if vision_tensor == tensor:
        dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
        _STATE = _Groups(llm_tp, llm_tp, None, dp_cp, ())
        return
    # Every rank's (pipeline rank, LLM TP group): all ranks then create the same groups in the
    # same order, as new_group requires.
    mine = (
        parallel_state.get_pipeline_model_parallel_rank(),
        tuple(dist.get_process_group_ranks(llm_tp)),
    )
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    tp_groups = sorted({ranks for _, ranks in everyone})
    me, created, found = dist.get_rank(), [], {}

    def make(kind: str, ranks: list[int]) -> None:
        group = dist.new_group(ranks)
        created.append(group)
        if me in ranks:
            found[kind] = group

    for ranks in tp_groups:
        for start in range(0, tensor, vision_tensor):
            make("tensor", list(ranks[start : start + vision_tensor]))
        for offset in range(vision_tensor):
            make("replicas", list(ranks[offset::vision_tensor]))
    # Holders of one ViT shard: same pipeline stage, same vision-TP rank, any DP/CP/replica.
    shard_of = {
        rank: (stage, ranks.index(rank) % vision_tensor)
        for stage, ranks in everyone
        for rank in ranks
    }
    for key in sorted(set(shard_of.values())):
        make("checkpoint", sorted(r for r, k in shard_of.items() if k == key))
    _STATE = _Groups(
        llm_tp, found["tensor"], found["replicas"], found["checkpoint"], tuple(created)
    )


def _destroy() -> None:
    global _STATE
    if _STATE is not None and dist.is_initialized():
        for group in _STATE.created:
            dist.destroy_process_group(group)
    _STATE = None


def _state() -> _Groups | None:
    """The vision groups, or None when they were never made for the current Megatron groups
    (then the ViT uses the LLM's TP group, as before vision_tensor existed)."""
    llm_tp = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    if _STATE is None or _STATE.llm_tensor is not llm_tp:
        return None
    return _STATE


def tensor_group() -> dist.ProcessGroup:
    """The ViT's tensor-parallel group."""
    state = _state()
    return state.tensor if state else parallel_state.get_tensor_model_parallel_group()


def replica_group() -> dist.ProcessGroup | None:
    """ViT replicas inside this LLM TP group (same vision-TP rank), or None when there is one."""
    state = _state()
    return state.replicas if state else None


def replica_count() -> int:
    group = replica_group()
    return group.size() if group is not None else 1


def replica_rank() -> int:
    group = replica_group()
    return group.rank() if group is not None else 0


def process_groups() -> ProcessGroupCollection:
    """Megatron's groups with the vision TP group as `tp`: what the ViT's layers are built on."""
    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.tp = tensor_group()
    return groups


def checkpoint_metadata(metadata: dict | None) -> dict:
    """Sharded-state-dict metadata whose replica ids count every holder of a ViT shard."""
    state = _state()
    group = (
        state.checkpoint_replicas
        if state
        else parallel_state.get_data_parallel_group(with_context_parallel=True)
    )
    return {**(metadata or {}), "dp_cp_group": group}


def tile_share(images_nchw: torch.Tensor) -> torch.Tensor:
    """This replica's contiguous share of the tiles, zero-padded so every share is equal."""
    count = replica_count()
    if count == 1:
        return images_nchw
    per = math.ceil(images_nchw.size(0) / count)
    share = images_nchw[replica_rank() * per :][:per]
    if share.size(0) < per:
        pad = share.new_zeros(per - share.size(0), *share.shape[1:])
        share = torch.cat([share, pad])
    return share


def gather_tiles(tokens_td: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """Every replica's image tokens [tiles_share * t, d] -> the first `n_tiles` tiles' tokens,
    in tile order. Backward hands each replica the gradient of its own share."""
    group = replica_group()
    if group is None:
        return tokens_td
    per_tile = tokens_td.size(0) // max(math.ceil(n_tiles / group.size()), 1)
    gathered = gather_from_sequence_parallel_region(
        tokens_td, tensor_parallel_output_grad=False, group=group
    )
    return gathered[: n_tiles * per_tile]


def mark_replicated(modules: Iterable[torch.nn.Module]) -> None:
    """Tag the ViT/projector parameters for the replica grad sum, and keep TP-sharded ones of
    non-first replicas out of the grad norm (Megatron skips `shared` parameters there)."""
    first = replica_rank() == 0
    for module in modules:
        for param in module.parameters():
            param.vision_replicated = True
            if not first and getattr(param, "tensor_model_parallel", False):
                param.shared = True


def sync_replicas(modules: Iterable[torch.nn.Module]) -> None:
    """Start all replicas from the first one's weights (initialization may differ by rank)."""
    group = replica_group()
    if group is None:
        return
    source = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                if not param.is_meta:
                    dist.broadcast(param.data, source, group=group)


def reduce_replica_grads(model: list[torch.nn.Module]) -> None:
    """Sum the ViT/projector gradients over the replicas (before the data-parallel reduction)."""
    group = replica_group()
    if group is None:
        return
    sequence_parallel = get_model_config(model[0]).sequence_parallel
    grads = [
        param.main_grad
        for chunk in model
        for param in chunk.parameters()
        if getattr(param, "vision_replicated", False)
        and param.requires_grad
        # Megatron sums these over the whole LLM TP group already (= vision TP x replicas).
        and not (sequence_parallel and getattr(param, "sequence_parallel", False))
    ]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, summed in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(summed)


def finalize_model_grads(model: list[torch.nn.Module], *args, **kwargs) -> None:
    """Megatron's finalize_model_grads, after summing the ViT replicas' gradients."""
    reduce_replica_grads(model)
    megatron_finalize_model_grads(model, *args, **kwargs)
