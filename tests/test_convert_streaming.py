"""Conversion streams: on a checkpoint of many shards, the peak memory a conversion adds (in
either direction) is a small multiple of the largest shard, not the model's size, and progress
is reported as it goes.

The peak is measured in a fresh process (VmHWM, the peak RSS of its address space, reset
before each direction), after a warm-up conversion of a tiny checkpoint there, so one-off costs
(imports, process groups) are part of the baseline. The whole-model converter this replaced
added more than the model.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_internvl.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_internvl.models.registry import InternVLSpec, get_spec
from tests.convert_cases import make_native, write_random_native

ROOT = Path(__file__).resolve().parent.parent
SHARD_BYTES = 12 * 2**20


def _wide_spec() -> InternVLSpec:
    """The tiny Qwen flavour widened to ~150 MB (float32) with no tensor above 17 MB."""
    tiny = get_spec("tiny_qwen_300m_style")
    vision = dataclasses.replace(
        tiny.vision, num_layers=4, hidden_size=256, num_attention_heads=4, head_dim=64,
        ffn_hidden_size=1024,
    )  # fmt: skip
    language = dataclasses.replace(
        tiny.language, num_layers=8, hidden_size=512, num_attention_heads=8,
        num_query_groups=2, ffn_hidden_size=1536, vocab_size=8192,
    )  # fmt: skip
    return dataclasses.replace(
        tiny, name="streaming_wide", vision=vision, language=language, image_token_id=8000
    )


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> None:
    """Set VmHWM to the current RSS (Linux >= 4.0); without it the growth is an upper bound."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        pass


def _measure(root: str) -> None:
    """Child process: warm up, then convert the wide checkpoint both ways, printing the peak
    RSS growth of each direction over the RSS just before it."""
    from megatron_internvl.models import registry

    root_dir = Path(root)
    spec = _wide_spec()
    registry.REGISTRY[spec.name] = spec
    quiet = lambda message: None  # noqa: E731
    hf_to_megatron(root_dir / "tiny", root_dir / "tiny_mg", "tiny_qwen_300m_style", log=quiet)
    megatron_to_hf(root_dir / "tiny_mg", root_dir / "tiny_back", log=quiet)
    growth = {}
    for step, run in (
        (
            "to-megatron",
            lambda: hf_to_megatron(root_dir / "hf", root_dir / "mg", spec.name, log=quiet),
        ),
        (
            "to-hf",
            lambda: megatron_to_hf(
                root_dir / "mg", root_dir / "back", max_shard_bytes=SHARD_BYTES, log=quiet
            ),
        ),
    ):
        _reset_peak()
        before = _status("VmRSS")
        run()
        growth[step] = _status("VmHWM") - before
    print(json.dumps(growth))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> tuple[dict, list[int]]:
    root = tmp_path_factory.mktemp("streaming")
    shards = write_random_native(_wide_spec(), root / "hf", SHARD_BYTES)
    make_native("tiny_qwen_300m_style", root / "tiny")
    code = f"from tests.test_convert_streaming import _measure; _measure({str(root)!r})"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), shards


@pytest.mark.parametrize("step", ["to-megatron", "to-hf"])
def test_peak_memory_is_bounded_by_the_largest_shard(measured, step):
    growth, shards = measured
    largest, total = max(shards), sum(shards)
    assert len(shards) >= 10 and total > 8 * largest  # a model well beyond any one shard
    print(f"{step}: +{growth[step] / 2**20:.0f} MiB; shards <= {largest / 2**20:.0f} MiB, "
          f"model {total / 2**20:.0f} MiB")  # fmt: skip
    assert growth[step] < 3 * largest, (growth[step], largest, total)


def test_progress_lines_reach_100_percent(tmp_path):
    make_native("tiny_qwen_300m_style", tmp_path / "hf")
    lines: list[str] = []
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", "tiny_qwen_300m_style", log=lines.append)
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", log=lines.append)
    for step in ("to-megatron", "to-hf"):
        shown = [line for line in lines if line.startswith(f"{step}:")]
        assert [line.split()[1] for line in shown] == [f"{10 * k}%" for k in range(1, 11)]
