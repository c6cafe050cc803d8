"""The README's main job: demo shards -> InternVL on 2 CPU ranks -> checkpoint -> HF export that
transformers loads."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import torch
from transformers import InternVLForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]


def test_demo_trains_checkpoints_and_exports(tmp_path):
    result = subprocess.run(
        ["bash", "scripts/demo.sh", "train.steps=16", "checkpoint.save_every=8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "RUN_ROOT": str(tmp_path), "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = re.findall(r"^step +\d+ \| loss ([\d.]+)", result.stdout, re.M)
    losses = [float(x) for x in printed]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.5
    # The README's sample output (scripts/readme_demo_output.py) is this run's: same step-1 loss.
    assert printed[0] == _readme_tool().readme_step1_loss((ROOT / "README.md").read_text())
    run = tmp_path / "demo_cpu_shards"
    assert "HF export" in result.stdout
    assert (run / "checkpoints" / "step_00000016" / "COMMITTED").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    model = InternVLForConditionalGeneration.from_pretrained(run / "hf").eval()
    assert (run / "hf" / "tokenizer.json").is_file()
    ids = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 19, model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def _readme_tool():
    path = ROOT / "scripts" / "readme_demo_output.py"
    spec = importlib.util.spec_from_file_location("readme_demo_output", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
