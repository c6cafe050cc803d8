"""Sweep declarations expand into validated training runs: model families derived from a registry
flavour, IsoFLOP points that spend their budget, bad sweeps refused with what to change, and
one Slurm array task per point through the project's launcher."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_internvl.models.registry import get_spec
from megatron_internvl.sweeps import launch
from megatron_internvl.sweeps.config import SweepError, compose_sweep
from megatron_internvl.sweeps.families import scale_spec
from megatron_internvl.sweeps.plan import build_plan, write_plan

ROOT = Path(__file__).resolve().parents[1]

# The demo recipe on generated rows: no shards needed to plan.
SYNTHETIC = [
    "recipe=demo_cpu",
    "overrides=['parallel.tensor=1','parallel.sequence_parallel=false','parallel.gpus=null',"
    "'train.warmup_steps=null','train.warmup_fraction=0.1']",
    "flops.sample_rows=4",
]


def test_families_scale_depth_and_width_of_a_registry_flavour():
    base = get_spec("tiny_qwen_300m_style")
    wide = scale_spec(base, vit_depth=1, vit_width=0.5, llm_depth=2, llm_width=2)
    assert wide.language.num_layers == 2 * base.language.num_layers
    assert wide.language.num_attention_heads == 2 * base.language.num_attention_heads
    assert wide.language.num_query_groups == 2 * base.language.num_query_groups
    assert wide.language.hidden_size == 2 * base.language.hidden_size  # head size kept
    assert wide.language.ffn_hidden_size == 2 * base.language.ffn_hidden_size
    assert wide.vision.num_attention_heads == 2 and wide.vision.head_dim == base.vision.head_dim
    assert wide.vision.hidden_size == base.vision.hidden_size // 2
    assert wide.name == "tiny_qwen_300m_style_sweep_vit2x16_llm8x128"
    with pytest.raises(SweepError, match=r"LLM layers 4 x depth 0.3 = 1.2 .* multiple of 1/4"):
        scale_spec(base, 1, 1, 0.3, 1)


def test_isoflop_points_spend_their_budget_and_small_budgets_are_dropped(tmp_path):
    cfg = compose_sweep(
        "cpu_mini",
        [
            *SYNTHETIC,
            f"output_dir={tmp_path}",
            "models.llm.depth=[0.5,1,2]",
            "budgets=[5e8,2e10]",
            "min_steps=4",
        ],
    )
    plan = build_plan(cfg)
    assert {p.budget for p in plan.points} == {2e10}
    assert len(plan.dropped) == 3 and all("min_steps=4" in d for d in plan.dropped)
    sizes = [p.params["non_embedding"] for p in plan.points]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    for p in plan.points:
        # whole steps: within half a step of the budget
        assert abs(p.flops - p.budget) <= 0.5 * p.flops / p.steps
        assert p.tokens == p.steps * 4 * 64  # demo_cpu: global_batch 4 rows of 64 tokens
    write_plan(cfg, plan)
    assert (tmp_path / "cpu_mini" / "plan.json").is_file()
    # A changed declaration may not silently reuse a point's results.
    plan.points[0].overrides.append("train.seed=7")
    with pytest.raises(SweepError, match="was planned with other settings"):
        write_plan(cfg, plan)


def test_bad_sweeps_say_what_to_change(tmp_path):
    with pytest.raises(SweepError, match=r"a grid sweep needs tokens=\[...\]"):
        compose_sweep("cpu_mini", [*SYNTHETIC, "kind=grid", "budgets=[]"])
    with pytest.raises(SweepError, match="no sweep recipe 'nope'"):
        compose_sweep("nope", [])
    with pytest.raises(SweepError, match="overrides may not set name or output_dir"):
        compose_sweep("cpu_mini", ["overrides=['name=x']"])
    # A point whose layout cannot work fails the plan, naming the point and the fix.
    cfg = compose_sweep(
        "cpu_mini",
        [
            "recipe=demo_cpu",
            f"output_dir={tmp_path}",
            "overrides=['parallel.tensor=2']",
            "launch.nproc=2",
            "models.llm.depth=[1]",
            "models.llm.width=[0.25]",
            "flops.sample_rows=2",
        ],
    )
    wrong = r"point C\S+llm4x16: .*1 attention heads are not divisible by tensor_parallel=2"
    with pytest.raises(SweepError, match=wrong):
        build_plan(cfg)


def test_slurm_runs_one_array_task_per_pending_point(tmp_path):
    cfg = compose_sweep(
        "cpu_mini",
        [*SYNTHETIC, f"output_dir={tmp_path}", "budgets=[2e10]", "launch.backend=slurm"],
    )
    plan = build_plan(cfg)
    write_plan(cfg, plan)
    sweep = tmp_path / "cpu_mini"
    points = [p.__dict__ for p in plan.points]
    (sweep / "points" / points[0]["id"] / "DONE").write_text("{}")
    chosen = launch.select(sweep, points, None, False)
    assert chosen.skipped == [points[0]["id"]] and len(chosen.run) == len(points) - 1
    array, scripts = launch.slurm_scripts(sweep, "cpu_mini", chosen.run, "local_cpu", [], 2)
    assert f"#SBATCH --array=0-{len(chosen.run) - 1}%2" in array
    assert "#SBATCH --ntasks-per-node=2" in array and "#SBATCH --requeue" in array
    assert subprocess.run(["bash", "-n"], input=array, text=True).returncode == 0
    for point in chosen.run:
        script = scripts[point["id"]]
        point_dir = (sweep / "points" / point["id"]).resolve()
        assert f"-m megatron_internvl.sweeps.point {point_dir}" in script
        assert "megatron_internvl.launch.task" not in script
        assert "scontrol requeue" in script  # the launcher's preemption handling is kept
        assert str(point_dir) in array
    only = launch.select(sweep, points, [points[1]["id"]], False)
    assert [p["id"] for p in only.run] == [points[1]["id"]]
    with pytest.raises(SweepError, match="no point"):
        launch.select(sweep, points, ["nope"], False)


def test_the_multirun_plans_then_refuses_what_it_cannot_run(tmp_path):
    """The Hydra app: a dry run plans and prints one job per point still to run; Hydra's comma
    sweeps and a run without --multirun are refused with what to do."""
    app = [sys.executable, "-m", "megatron_internvl.sweeps.app"]
    args = ["--config-name", "cpu_mini", *SYNTHETIC, f"output_dir={tmp_path}", "budgets=[2e10]"]

    def run(*command: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    dry = run(*app, "-m", *args, "hydra/launcher=basic", "launch.dry_run=true")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert not (tmp_path / "cpu_mini").exists()  # a dry run writes nothing
    planned = [p.id for p in build_plan(compose_sweep("cpu_mini", args[2:])).points]
    assert f"{len(planned)} to run, 0 already done" in dry.stdout
    jobs = [line for line in dry.stdout.splitlines() if "point=" in line]
    assert [j.rsplit("point=", 1)[1].strip("'") for j in jobs] == planned

    swept = run(*app, "-m", *args, "lr=1e-4,2e-4")
    assert swept.returncode == 2 and "not Hydra's comma sweeps" in swept.stderr
    single = run(*app, *args)
    assert single.returncode == 2 and "add --multirun" in single.stderr


@pytest.mark.parametrize("name", ["grid", "isoflop"])
def test_cluster_sweep_recipes_plan_at_their_scale(name, tmp_path):
    cfg = compose_sweep(
        name,
        [
            f"output_dir={tmp_path}",
            "flops.sample_rows=1",
            "overrides=['data.source=synthetic','parallel.gpus=null','train.lr=2e-4']",
        ],
    )
    plan = build_plan(cfg)
    assert len(plan.points) == {"grid": 24, "isoflop": 18}[name] - len(plan.dropped)
    assert all(p.spec["name"].startswith("internvl2_5_1b_sweep_") for p in plan.points)
    assert all(f"output_dir={tmp_path / cfg.name / 'points'}" in p.overrides for p in plan.points)


def test_a_point_trains_the_scaled_shape_from_its_spec_file(tmp_path):
    from megatron_internvl.config.schema import load_run_config
    from megatron_internvl.train import compose
    from megatron_internvl.training.loop import resolved_spec

    cfg = compose_sweep("cpu_mini", [*SYNTHETIC, f"output_dir={tmp_path}", "budgets=[2e10]"])
    plan = build_plan(cfg)
    write_plan(cfg, plan)
    point = plan.points[-1]
    run = load_run_config(compose(point.overrides))
    assert run.model.spec_file.endswith(f"{point.id}/spec.json")
    spec = resolved_spec(run)
    assert spec == scale_spec(
        get_spec("tiny_qwen_300m_style"),
        point.vit_depth,
        point.vit_width,
        point.llm_depth,
        point.llm_width,
    )
    assert (spec.language.num_layers, spec.language.hidden_size) == (
        point.llm_layers,
        point.llm_hidden,
    )


def test_the_readme_cluster_commands_run_as_written_and_write_nothing(tmp_path):
    """`plan isoflop` and `launch isoflop --dry-run` exactly as the README writes them (from a
    directory of their own: neither may write anything), and both --help texts."""
    tool = [sys.executable, str(ROOT / "tools" / "sweep.py")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
        )

    plan = run(*tool, "plan", "isoflop")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert re.search(r"^16 points in runs/sweeps/isoflop_1b", plan.stdout, re.M), plan.stdout
    assert "dropped: vit24x1024_llm24x1792 at budget 1e+19" in plan.stdout
    dry = run(*tool, "launch", "isoflop", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "#SBATCH --array=0-15%8" in dry.stdout and "#SBATCH --nodes=4" in dry.stdout
    assert list(tmp_path.iterdir()) == []
    for command in (tool, [sys.executable, "-m", "megatron_internvl.sweeps.app"]):
        shown = run(*command, "--help")
        assert shown.returncode == 0, shown.stderr[-2000:]
        assert "usage" in shown.stdout.lower() and "cpu_scaling" in shown.stdout


def test_planned_compute_does_not_depend_on_how_a_step_splits_into_micro_batches(tmp_path):
    """The loader hands out micro-batches of train.micro_batch rows flattened into one: a plan
    that took one for a row would count a 4-row micro-batch's FLOPs once per row (4x the
    compute, 1/4 of the steps). The same 4 rows drawn as 4 micro-batches of 1 or one of 4 must
    plan the same steps and FLOPs."""

    def plan(micro_batch: int, sample_rows: int):
        overrides = SYNTHETIC[1][: -len("]")] + f",'train.micro_batch={micro_batch}']"
        cfg = compose_sweep(
            "cpu_mini",
            [
                SYNTHETIC[0],
                overrides,
                f"flops.sample_rows={sample_rows}",
                f"output_dir={tmp_path / str(micro_batch)}",
                "models.llm.depth=[0.5,1]",
                "budgets=[2e10]",
            ],
        )
        return build_plan(cfg)

    one, four = plan(1, 4), plan(4, 1)
    assert four.data["rows"] == one.data["rows"] == 4
    assert [(p.id, p.steps) for p in four.points] == [(p.id, p.steps) for p in one.points]
    for a, b in zip(one.points, four.points, strict=True):
        assert b.flops == pytest.approx(a.flops, rel=1e-9)
