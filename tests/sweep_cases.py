"""What the sweep tests share: the bundled demo shards, and the cpu_mini sweep's arguments on
them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from megatron_internvl.sweeps.config import compose_sweep

ROOT = Path(__file__).resolve().parents[1]


def demo_shards(out: Path) -> Path:
    """Build the demo shards into `out` (a few seconds); returns it."""
    subprocess.run(
        [sys.executable, "tools/build_shards.py", "--demo", "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return out


def cpu_mini_args(out: Path, shards: Path) -> list[str]:
    """Overrides of recipes/sweep/cpu_mini.yaml that put it in `out` and train on `shards`."""
    base = compose_sweep("cpu_mini", []).overrides
    items = ",".join(f"'{o}'" for o in [*base, f"data.shards=[{shards}]"])
    return [f"output_dir={out}", f"overrides=[{items}]"]
