"""The CPU demo: a small Megatron-Core language model trained on CPU ranks, loss printed.

Launch with torchrun (the README's first command does):
    torchrun --standalone --nproc-per-node 2 -m megatron_internvl.training.demo --tp 2

The task is learnable in seconds: every sequence follows one fixed random permutation of the
vocabulary (token t is followed by perm[t]), so a working model drives the loss from ln(vocab)
towards zero. It runs through the same pieces a real run uses: the parallel layout, Megatron
DDP, the distributed optimizer, the pipeline schedules and token-averaged loss.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_internvl.models.language import LanguageConfig, build_gpt_chunks
from megatron_internvl.parallel import runtime
from megatron_internvl.parallel.layout import ParallelLayout
from megatron_internvl.training.step import (
    forward_backward,
    language_model_forward_step,
    wrap_with_ddp,
)

DEMO_LM = LanguageConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=128,
    rope_theta=10000,
)


def permutation_chains(
    vocab: int, seq: int, micro_batch: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless microbatches of sequences that follow one fixed permutation of the vocabulary."""
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.empty(micro_batch, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (micro_batch,), generator=gen)
        for i in range(seq):
            tokens[:, i + 1] = perm[tokens[:, i]]
        yield {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": torch.ones(micro_batch, seq),
            "position_ids": torch.arange(seq).expand(micro_batch, seq),
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--cp", type=int, default=1, help="context-parallel size")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=2, help="per DP rank and step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    layout = ParallelLayout(
        tensor=args.tp,
        pipeline=args.pp,
        context=args.cp,
        sequence_parallel=args.sequence_parallel,
    )
    runtime.initialize(layout, seed=args.seed)
    rank0 = dist.get_rank() == 0
    dp_size = parallel_state.get_data_parallel_world_size()
    config = runtime.adapt_model_config(DEMO_LM.transformer_config(layout))
    model = wrap_with_ddp(
        build_gpt_chunks(config, DEMO_LM, max_sequence_length=args.seq_length),
        config,
        use_distributed_optimizer=True,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            weight_decay=0.01,
            clip_grad=1.0,
            use_distributed_optimizer=True,
        ),
        model,
    )
    data = permutation_chains(
        DEMO_LM.vocab_size,
        args.seq_length,
        args.micro_batch,
        seed=args.seed + parallel_state.get_data_parallel_rank(),
    )
    if rank0:
        world = dist.get_world_size()
        print(f"demo: {world} ranks, layout {layout} x dp{dp_size}, {args.steps} steps", flush=True)

    losses = []
    tokens_per_step = args.seq_length * args.micro_batch * args.microbatches * dp_size
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        loss = forward_backward(
            language_model_forward_step,
            data,
            model,
            num_microbatches=args.microbatches,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch,
        )
        _, grad_norm, _ = optimizer.step()
        losses.append(loss)
        if rank0 and (step % args.log_every == 0 or step == 1):
            rate = tokens_per_step * step / (time.perf_counter() - start)
            print(
                f"step {step:4d} | loss {loss:.4f} | grad norm {grad_norm:.3f} | "
                f"{rate:,.0f} tokens/s",
                flush=True,
            )
    runtime.shutdown()
    fell = losses[-1] < 0.5 * losses[0]
    if rank0:
        print(
            f"demo: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
            f"(ln vocab = {math.log(DEMO_LM.vocab_size):.3f}); "
            + ("the model learned the task" if fell else "the loss did NOT fall"),
            flush=True,
        )
    return 0 if fell else 1


if __name__ == "__main__":
    sys.exit(main())
