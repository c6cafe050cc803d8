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
# Progress: a numbered line per step with its time; on a terminal pip also shows its download
# bars (in logs it stays quiet, one line per step).
pip_out=(-q)
[ -t 2 ] && pip_out=(--progress-bar on)
step() { echo "setup: [$1/4] $2 (${SECONDS}s so far)" >&2; }
echo "setup: installing into $venv (once per pyproject.toml; a few minutes)" >&2
step 1 "creating the virtual environment"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
step 2 "upgrading pip"
"$venv/bin/python" -m pip install "${pip_out[@]}" --upgrade pip
step 3 "installing ${TORCH_SPEC:-torch==2.13.0} (the largest download)"
"$venv/bin/python" -m pip install "${pip_out[@]}" "${TORCH_SPEC:-torch==2.13.0}"
step 4 "installing megatron-internvl with its dependencies and test tools"
"$venv/bin/python" -m pip install "${pip_out[@]}" -e "$root[dev]"
rm -f "$venv"/.installed-*
touch "$stamp"
echo "setup: done in ${SECONDS}s" >&2
