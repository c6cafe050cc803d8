"""Rank functions for the tiny Megatron-Core GPT used to prove the parallel machinery on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig

from megatron_internvl.models.language import LanguageConfig, build_gpt_chunks
from megatron_internvl.parallel import cpu_platform
from megatron_internvl.parallel.layout import ParallelLayout
from megatron_internvl.training.step import (
    forward_backward,
    language_model_forward_step,
    wrap_with_ddp,
)
from tests import parity

VOCAB = 64
SEQ = 16
MICRO_BATCH = 2
NUM_MICROBATCHES = 4
REFERENCE = ParallelLayout()
ADAM_LR = 1e-2


TINY_LM = LanguageConfig(
    num_layers=4,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=48,
    vocab_size=VOCAB,
    kv_channels=8,
    rope_theta=10000,
)


def build(
    layout: ParallelLayout,
    use_distributed_optimizer: bool = False,
    batch_p2p_comm: bool | None = None,
):
    config = cpu_platform.adapt_model_config(TINY_LM.transformer_config(layout))
    if batch_p2p_comm is not None:  # to show what the platform's default protects against
        config.batch_p2p_comm = batch_p2p_comm
    chunks = build_gpt_chunks(config, TINY_LM, max_sequence_length=SEQ)
    return wrap_with_ddp(chunks, config, use_distributed_optimizer), config


def global_batch(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Microbatches of a learnable next-token task with some masked-out label positions."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(NUM_MICROBATCHES):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=gen)
        loss_mask = (torch.rand(MICRO_BATCH, SEQ, generator=gen) > 0.2).float()
        batches.append(
            {
                "tokens": tokens[:, :-1],
                "labels": tokens[:, 1:],
                "loss_mask": loss_mask,
                "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ),
            }
        )
    return batches


forward_step = language_model_forward_step


def train_step(chunks, layout: ParallelLayout, batches) -> float:
    microbatches = parity.layout_batches(batches, layout)
    return forward_backward(
        forward_step,
        parity.data_iterators(microbatches, len(chunks)),
        chunks,
        num_microbatches=len(microbatches),
        seq_length=SEQ,  # Megatron divides by CP (and TP under SP) itself
        micro_batch_size=MICRO_BATCH,
    )


def layout_parity(
    tmp: str, layouts: list[ParallelLayout], batch_p2p_comm: bool | None = None
) -> dict[str, Any]:
    """Loss and max gradient difference of each layout against one rank's."""
    batches = global_batch()
    return parity.compare_layouts(
        Path(tmp),
        lambda layout: build(layout, batch_p2p_comm=batch_p2p_comm)[0],
        lambda chunks, layout: train_step(chunks, layout, batches),
        layouts,
    )


def distributed_optimizer_parity(tmp: str) -> dict[str, Any]:
    """One clipped Adam step: distributed optimizer on DP ranks vs a plain optimizer."""
    batches = global_batch(seed=1)
    return parity.compare_optimizer_step(
        Path(tmp),
        lambda layout, distributed: build(layout, use_distributed_optimizer=distributed)[0],
        lambda chunks, layout: train_step(chunks, layout, batches),
        REFERENCE,  # at world size 2: DP=2
        # adam_eps 1e-4: with 1e-8, Adam's first step (~lr * sign(g)) turns reduction-order noise in
        # near-zero gradients into visible parameter differences and hides real ones.
        OptimizerConfig(
            optimizer="adam", lr=ADAM_LR, clip_grad=0.05, weight_decay=0.1, adam_eps=1e-4
        ),
    )


def _gathered_logits(chunks, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits of a PP=1 model at any TP size."""
    from megatron_internvl.parallel.collectives import all_gather_dim0

    logits = chunks[0](tokens, torch.arange(tokens.size(1)).expand_as(tokens), None)
    group = parallel_state.get_tensor_model_parallel_group()
    return all_gather_dim0(logits.movedim(-1, 0), group).movedim(0, -1).detach()


def checkpoint_reshard(tmp: str) -> dict[str, Any]:
    """Save at TP=2, reload at TP=1 (same outputs), and back at TP=2 (same shards, bit for bit)."""
    tmp_path = Path(tmp)
    tp2 = ParallelLayout(tensor=2)
    tokens = global_batch()[0]["tokens"]

    parity.use_layout(tp2, seed=7)
    chunks, _ = build(tp2)
    logits_tp2 = _gathered_logits(chunks, tokens)
    shards_tp2 = {
        k: v.detach().clone()
        for k, v in chunks[0].module.state_dict().items()
        if isinstance(v, torch.Tensor)
    }
    parity.save_sharded(chunks, tmp_path / "tp2")

    parity.use_layout(REFERENCE, seed=99)  # a different init, so loading must overwrite it
    ref, _ = build(REFERENCE)
    parity.load_sharded(ref, tmp_path / "tp2")
    logits_tp1 = _gathered_logits(ref, tokens)
    parity.save_sharded(ref, tmp_path / "tp1")

    parity.use_layout(tp2, seed=5)
    again, _ = build(tp2)
    parity.load_sharded(again, tmp_path / "tp1")
    reloaded = again[0].module.state_dict()
    mismatched = [k for k, v in shards_tp2.items() if not torch.equal(v, reloaded[k])]
    return {
        "logits_max_diff": float((logits_tp2 - logits_tp1).abs().max()),
        "logits_scale": float(logits_tp1.abs().max()),
        "vocab": logits_tp1.size(-1),
        "shards_compared": len(shards_tp2),
        "mismatched_shards": mismatched,
    }
