"""The README's main job: demo shards -> InternVL on 2 CPU ranks -> checkpoint -> HF export that
transformers loads."""

from __future__ import annotations

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
    losses = [float(x) for x in re.findall(r"^step +\d+ \| loss ([\d.]+)", result.stdout, re.M)]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.5
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
