#!/usr/bin/env python
"""Regenerate the README's sample demo output from a real run's console output.

  RUN_ROOT=/tmp/demo scripts/demo.sh | tee /tmp/demo.log
  python scripts/readme_demo_output.py /tmp/demo.log      # rewrites the block in README.md

The block keeps the first and last step lines, the final save and the artefact list, with the
run's output root shown as `runs` (the demo's default). tests/test_demo.py checks that the
README's step-1 loss is what a fresh demo run prints.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
STEP = re.compile(r"^step +\d+ \| loss .*$", re.M)
BLOCK = re.compile(r"(```\n)(step +1 \|.*?)(```)", re.S)


def sample_block(log: str) -> str:
    """The README block for a demo run's console output."""
    steps = STEP.findall(log)
    if not steps:
        raise ValueError("no 'step N | loss' lines: pass the console output of scripts/demo.sh")
    saved = re.findall(r"^saved (\S+)", log, re.M)  # without its size and time
    artefacts = log[log.index("demo artefacts:") :].rstrip("\n").splitlines()
    root = re.search(r"^  shards +(\S+)/demo_shards$", log, re.M)
    lines = [steps[0], "...", steps[-1], *([f"saved {saved[-1]}"] if saved else []), *artefacts]
    text = "\n".join(lines) + "\n"
    return text.replace(root.group(1) + "/", "runs/") if root else text


def readme_step1_loss(readme: str) -> str:
    """The step-1 loss the README shows (as printed, 4 decimals)."""
    match = BLOCK.search(readme)
    if match is None:
        raise ValueError("README has no sample demo block")
    return re.search(r"loss ([\d.]+)", match.group(2)).group(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="console output of scripts/demo.sh")
    args = parser.parse_args(argv)
    block = sample_block(Path(args.log).read_text())
    readme = README.read_text()
    if BLOCK.search(readme) is None:
        print("error: README has no sample demo block", file=sys.stderr)
        return 2
    README.write_text(BLOCK.sub(lambda m: m.group(1) + block + m.group(3), readme, count=1))
    print(block, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
