"""The layout planner: its parameter/gradient/optimizer model against real Megatron ranks, and
its CLI on the 78B flavour."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from megatron.core import parallel_state

from megatron_internvl.models.registry import get_spec
from megatron_internvl.parallel.layout import ParallelLayout
from tests.harness import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
FLAVOUR = "tiny_internlm_6b_style"  # 5 ViT heads: padded to 6 for TP=2
# (layout, first_stage_layers, training stage); 4 ranks each.
PLAN_8B = ["--model", "internvl2_5_8b", "--gpus", "512", "--gpu-memory-gb", "80", "--top", "3"]
# validate()'s structural checks are the oracle: data paths only need to be set, and its own
# (coarser, SP-blind) memory estimate is switched off by a zero GPU memory.
RECIPE_8B = [
    "recipe=internvl2_5_8b_stage2",
    "data.shards=[shards]",
    "data.tokenizer=tok",
    "cluster.gpu_memory_gb=0",
]
CASES = [
    (ParallelLayout(tensor=2, sequence_parallel=True), None, "2"),  # TP=2 x DP=2
    (ParallelLayout(pipeline=2), 1, "2"),  # PP=2 (1 + 3 layers) x DP=2
    (ParallelLayout(tensor=2, pipeline=2), None, "2"),  # DP=1
    (ParallelLayout(tensor=2), None, "1"),  # frozen ViT and LLM: only the projector trains
]


def measure_rank(cases: list) -> list[dict]:
    """Per case: what this rank's real model, DDP buffers and distributed optimizer hold."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_internvl.models.internvl import build_internvl_chunks
    from megatron_internvl.parallel import cpu_platform
    from megatron_internvl.training.freezing import freeze_for_stage
    from megatron_internvl.training.step import wrap_with_ddp
    from tests import internvl_cases, parity

    measured = []
    for layout, first, stage in cases:
        parity.use_layout(layout)
        chunks = build_internvl_chunks(
            get_spec(FLAVOUR), layout, internvl_cases.SEQ, first, vision_pad_heads_to=2
        )
        for chunk in chunks:
            cpu_platform.adapt_model_config(chunk.config)
        if stage != "2":
            freeze_for_stage(chunks, stage)
        model = wrap_with_ddp(chunks, chunks[0].config, use_distributed_optimizer=True)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True), model
        )
        optimizer.zero_grad()
        internvl_cases.step(model, layout, internvl_cases.packed_microbatches(FLAVOUR))
        optimizer.step()  # Adam creates its state on the first step
        states = [
            state
            for inner in getattr(optimizer, "chained_optimizers", [optimizer])
            for state in inner.optimizer.state.values()
        ]
        measured.append(
            {
                "stage": parallel_state.get_pipeline_model_parallel_rank(),
                "dp_rank": parallel_state.get_data_parallel_rank(with_context_parallel=True),
                "params": sum(p.numel() for c in chunks for p in c.parameters()),
                "grad_buffer": sum(b.grad_data.numel() for m in model for b in m.buffers),
                "param_buffer": sum(b.param_data.numel() for m in model for b in m.buffers),
                "exp_avg": sum(s["exp_avg"].numel() for s in states),
                "exp_avg_sq": sum(s["exp_avg_sq"].numel() for s in states),
            }
        )
    return measured


def test_memory_model_counts_match_real_ranks(tmp_path):
    from megatron_internvl.parallel import runtime
    from megatron_internvl.planner.params import param_table, rank_share

    per_rank = run_on_ranks(measure_rank, 4, CASES, timeout_s=600)
    with runtime.single_process():
        table = param_table(get_spec(FLAVOUR), 2)
    for index, (layout, first, stage) in enumerate(CASES):
        dp = 4 // layout.model_parallel
        for rank, rows in enumerate(per_rank):
            got = rows[index]
            share = rank_share(
                table,
                tensor=layout.tensor,
                pipeline=layout.pipeline,
                stage=got["stage"],
                first_stage_layers=first,
                data_parallel=dp,
                data_parallel_rank=got["dp_rank"],
                training_stage=stage,
            )
            where = f"case {index} ({layout}, stage {stage}) rank {rank}"
            assert got["params"] == share.params, where
            assert got["grad_buffer"] == share.grad_buffer, where
            assert got["param_buffer"] == share.grad_buffer, where
            assert got["exp_avg"] == got["exp_avg_sq"] == share.optimizer_shard, where
        # The shards of one stage's DP ranks cover its trained parameters exactly once.
        for stage_index in range(layout.pipeline):
            rows = [r[index] for r in per_rank if r[index]["stage"] == stage_index]
            tp_ranks = layout.tensor
            covered = sum(r["exp_avg"] for r in rows) // tp_ranks
            assert (
                covered
                == rank_share(
                    table,
                    tensor=layout.tensor,
                    pipeline=layout.pipeline,
                    stage=stage_index,
                    first_stage_layers=first,
                    data_parallel=dp,
                    training_stage=stage,
                ).trained_params
            )


def test_plan_cli_choices_are_valid_recipes():
    """The CLI's choices for 8B at InternVL's 512 GPUs compose with the recipe and pass the
    training entry's own validation; every printed peak fits; refusals name their reason."""
    from megatron_internvl.config.schema import load_run_config
    from megatron_internvl.config.validate import validate
    from megatron_internvl.train import compose

    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plan.py"), *PLAN_8B],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    chosen = [
        line.split("overrides: ")[1].split() for line in out.splitlines() if "overrides:" in line
    ][:3]
    assert len(chosen) == 3, out
    for overrides in chosen:
        cfg = load_run_config(compose([*RECIPE_8B, *overrides]))
        validate(cfg, get_spec("internvl2_5_8b"), 512)
    peaks = [
        float(line.split("peak ")[1].split(" GB")[0])
        for line in out.splitlines()
        if ": step " in line
    ]
    assert len(peaks) == 4 and all(peak <= 80 for peak in peaks[:3]), out
    refused = out.split("refused ")[1]
    assert "TP crosses nodes" in refused and "over 80 GB" in refused, out


PLAN_CLI = [sys.executable, str(REPO / "tools" / "plan.py"), "--gpu-memory-gb", "80"]


@pytest.mark.parametrize(("size", "gpus"), [("26b", 512), ("38b", 512), ("78b", 1024)])
def test_shipped_large_recipes_fit_by_the_planners_model(size, gpus):
    """The shipped 26B/38B/78B stage-2 layouts fit 80 GB by the planner's own memory model
    (with model.recompute=full they did not: stage 0 kept the ViT's activations in flight), and
    their first_stage_layers is the planner's choice for their TP/PP."""
    result = subprocess.run(
        [*PLAN_CLI, "--model", f"internvl2_5_{size}", "--gpus", str(gpus), "--top", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    shipped = result.stdout.split("Shipped recipe")[1].split("refused")[0]
    assert "recompute=full+vit" in shipped and "    fits in 80 GB" in shipped, shipped
    assert "planner's first_stage_layers for this layout: " in shipped, shipped
    assert "(the shipped value)" in shipped, shipped
