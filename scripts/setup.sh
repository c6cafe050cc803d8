#!/usr/bin/env bash
# Create the project's virtual environment and install it with its test tools. Idempotent: it
# does the work once per version of pyproject.toml and is a no-op afterwards.
#   VENV         where the environment lives (default: .venv in the repository)
#   TORCH_SPEC   the torch requirement installed first (default: torch==2.13.0). On CPU-only
#                hosts pin a CPU build here, since a bare `torch` pulls a multi-GB CUDA build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$root/.venv}
stamp="$venv/.installed-$(cat "$root/pyproject.toml" "$0" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "setup: installing into $venv (once)" >&2
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$venv/bin/python" -m pip install -q -e "$root[dev]"
rm -f "$venv"/.installed-*
touch "$stamp"
echo "setup: done" >&2
