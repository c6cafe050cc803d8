"""Our Megatron InternVL has exactly transformers' parameter count for every flavour."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_internvl.models.info import parameter_counts
from megatron_internvl.models.registry import REGISTRY
from tests.hf_oracle import hf_parameter_counts

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_counts_equal_transformers_internvl(single_rank, name):
    assert parameter_counts(REGISTRY[name]) == hf_parameter_counts(REGISTRY[name])


def test_cli_prints_json_counts():
    result = subprocess.run(
        [sys.executable, "tools/model_info.py", "--model", "internvl2_5_1b", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert counts["model"] == "internvl2_5_1b"
    assert round(counts["total"] / 1e9, 2) == 0.94  # the model card's 0.94B
    assert counts["total"] == counts["vision"] + counts["projector"] + counts["language"]


def test_cli_names_the_known_flavours_for_an_unknown_one():
    result = subprocess.run(
        [sys.executable, "tools/model_info.py", "--model", "internvl9_1b"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "internvl2_5_8b" in result.stderr
