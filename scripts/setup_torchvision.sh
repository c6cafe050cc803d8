#!/usr/bin/env bash
# A side environment with torchvision, for the one test that loads our HF export through
# transformers' AutoProcessor (its InternVL video processor imports torchvision, and PyPI's
# torchvision cannot load beside the project's CPU torch 2.13.0). It holds only what that check
# needs: torch 2.14.1 + torchvision 0.29.1 (a CUDA build, ~5.5 GB; pip takes both from the local
# wheel store where there is one) and the main environment's transformers. Idempotent.
#   TORCHVISION_VENV  where it lives (default: .venv-torchvision in the repository)
#   VENV              the main environment, whose transformers version is matched
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
side=${TORCHVISION_VENV:-$root/.venv-torchvision}
main=${VENV:-$root/.venv}
transformers=$("$main/bin/python" -c "import transformers; print(transformers.__version__)")
stamp="$side/.installed-$transformers-$(sha256sum "$0" | cut -c1-16)"
[ -f "$stamp" ] && exit 0
echo "setup_torchvision: installing torch 2.14.1, torchvision 0.29.1, transformers $transformers into $side" >&2
[ -x "$side/bin/python" ] || "${PYTHON:-python3}" -m venv "$side"
"$side/bin/python" -m pip install -q --progress-bar off torch==2.14.1 torchvision==0.29.1 \
  "transformers==$transformers" safetensors pillow jinja2
rm -f "$side"/.installed-*
touch "$stamp"
echo "setup_torchvision: done in ${SECONDS}s" >&2
