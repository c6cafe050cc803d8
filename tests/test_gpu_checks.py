"""scripts/gpu_checks.sh runs every step in --dry-run mode on the CPU and leaves a results file
whose figures agree with each other, and the README's GPU table is exactly the one made from the
newest committed results file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_report  # noqa: E402

FIELDS = ("step_s", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_mem_gb")
STEPS = (
    "pytest_gpu",
    "bench_llm",
    "fp8_convergence",
    "bench_internvl",
    "data_gpu",
    "vit_vision_tp",
)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu_checks")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "scripts/gpu_checks.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out


def test_every_step_runs_and_the_results_file_is_consistent(dry_run: Path) -> None:
    summary = (dry_run / "summary.txt").read_text()
    for name in STEPS:
        assert f" {name} rc=0 " in summary, summary
    record = json.loads((dry_run / "gpu-results.json").read_text())
    assert record["dry_run"] is True and record["gpu"] == "CPU" and record["te"] is None
    assert set(record["workloads"]) == {"bench_llm", "bench_internvl"}
    assert set(record["workloads"]["bench_llm"]["precisions"]) == {"fp32", "bf16"}
    for work in record["workloads"].values():
        for figures in work["precisions"].values():
            assert set(FIELDS) <= set(figures)
            for side in (figures, figures["baseline"]):
                assert side["step_s"] > 0
                tokens = work["tokens_per_step"] / side["step_s"]
                assert side["tokens_per_s"] == pytest.approx(tokens, rel=1e-9)
                tflops = work["tflop_per_step"] / side["step_s"]
                assert side["tflops_per_gpu"] == pytest.approx(tflops, rel=1e-9)
                assert side["mfu"] is None  # no peak on a CPU
    vit = json.loads((dry_run / "vit_vision_tp.json").read_text())
    whole, sliced = vit["results"]  # vision TP 1: whole ViT on a share; TP 2: a slice on all
    assert (whole["heads"], sliced["heads"]) == (5, 3)  # 5 heads padded to 6 over TP 2
    assert (whole["tiles"], sliced["tiles"]) == (2, 4)
    assert vit["ratio"] == pytest.approx(sliced["step_s"] / whole["step_s"])
    # fp32 vs bf16 curves only: no FP8 gap to report, the bf16 gap is recorded.
    assert record["fp8_curve_max_gap"] is None
    assert 0 <= record["curve_gaps"]["bf16"] < 0.02


def test_readme_table_is_rewritten_between_markers(dry_run: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{gpu_report.BEGIN}\nold table\n{gpu_report.END}\nafter\n")
    report = [sys.executable, str(ROOT / "benchmarks" / "gpu_report.py")]
    subprocess.run([*report, "readme", str(dry_run / "gpu-results.json"), str(readme)], check=True)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\nbefore\n") and text.endswith("after\n")
    record = json.loads((dry_run / "gpu-results.json").read_text())
    bf16 = record["workloads"]["bench_llm"]["precisions"]["bf16"]
    assert f"{bf16['step_s']:.4f} s" in text and "DRY RUN" in text
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    failed = subprocess.run(
        [*report, "readme", str(dry_run / "gpu-results.json"), str(bare)],
        capture_output=True,
        text=True,
    )
    assert failed.returncode != 0 and "markers" in failed.stderr
    assert bare.read_text() == "no markers\n"


def test_readme_holds_the_table_of_the_newest_results_file() -> None:
    newest = sorted((ROOT / "benchmarks" / "results").glob("gpu-*.json"))[-1]
    record = json.loads(newest.read_text())
    assert record["dry_run"] is False
    text = (ROOT / "README.md").read_text()
    between = text.split(gpu_report.BEGIN, 1)[1].split(gpu_report.END, 1)[0]
    assert between.strip() == gpu_report.table(record).strip()
