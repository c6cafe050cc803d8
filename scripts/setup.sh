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
# bars; in logs, pip's lines that name a download with its size and what was installed (its
# whole output is shown if it fails).
step() { echo "setup: [$1/4] $2 (${SECONDS}s so far)" >&2; }
pip_install() {
  if [ -t 2 ]; then
    "$venv/bin/python" -m pip install --progress-bar on "$@"
    return
  fi
  local log status
  log=$(mktemp)
  set +e
  "$venv/bin/python" -m pip install --progress-bar off "$@" 2>&1 | tee "$log" |
    grep --line-buffered -E '^ *((Downloading|Processing) [^ ]+\.(whl|tar\.gz)|Successfully installed)' |
    sed -u 's/^ */setup:   /' >&2
  status=${PIPESTATUS[0]}
  set -e
  [ "$status" -eq 0 ] || cat "$log" >&2
  rm -f "$log"
  return "$status"
}
echo "setup: installing into $venv (once per pyproject.toml; a few minutes)" >&2
step 1 "creating the virtual environment"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
step 2 "upgrading pip"
pip_install --upgrade pip
step 3 "installing ${TORCH_SPEC:-torch==2.13.0} (the largest download)"
pip_install "${TORCH_SPEC:-torch==2.13.0}"
step 4 "installing megatron-internvl with its dependencies and test tools"
pip_install -e "$root[dev]"
rm -f "$venv"/.installed-*
touch "$stamp"
echo "setup: done in ${SECONDS}s" >&2
