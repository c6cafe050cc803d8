"""The demo data shipped in the repository (demo/): photos, conversations and a tiny tokenizer.

`demo/data/demo.json` holds hand-written captions and Q&A (LLaVA style, single- and multi-image
and text-only records) about scikit-image's bundled photographs in `demo/data/images`
(written by `tools/build_demo_images.py`); `demo/tokenizer` is a ~1000-token byte-level BPE
with the InternVL special tokens (built by `tools/build_demo_tokenizer.py`). Available in a
source checkout, not in an installed wheel.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megatron_internvl.data.shard_builders import (
    BuildSummary,
    ShardOutput,
    build_shards,
    load_records,
)

DEMO_DIR = Path(__file__).resolve().parents[2] / "demo"


def _check() -> None:
    if not (DEMO_DIR / "data" / "demo.json").exists():
        raise FileNotFoundError(
            f"{DEMO_DIR}: the demo data lives in the source tree (demo/); run from a checkout"
        )


def build_demo_shards(out_dir: str | os.PathLike, max_samples: int = 8) -> BuildSummary:
    """Write the demo data as shards (+ indexes) into `out_dir`; the summary lists them."""
    _check()
    records = load_records(DEMO_DIR / "data" / "demo.json")
    output = ShardOutput(out_dir, "demo", max_samples=max_samples, progress_bar=False)
    return build_shards(records, DEMO_DIR / "data", output)


def demo_tokenizer() -> Any:
    """The demo tokenizer (a HF fast tokenizer)."""
    from transformers import AutoTokenizer

    _check()
    return AutoTokenizer.from_pretrained(DEMO_DIR / "tokenizer")
