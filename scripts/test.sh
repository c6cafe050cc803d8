#!/usr/bin/env bash
# The test suite: lint, then every test (distributed ones spawn CPU ranks). Extra arguments go
# to pytest, e.g. scripts/test.sh -k parallel.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$root/.venv}
"$root/scripts/setup.sh"
cd "$root"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
exec "$venv/bin/python" -m pytest "$@"
