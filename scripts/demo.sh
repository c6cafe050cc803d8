#!/usr/bin/env bash
# The main job: a small Megatron-Core model trained on CPU ranks (2 by default, tensor parallel),
# loss printed as it falls. Extra arguments go to the demo (see --help), e.g. --tp 1 --pp 2.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$root/.venv}
"$root/scripts/setup.sh"
cd "$root"
# Megatron-Core warns at import that TE/apex are absent, which is expected on CPU.
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::UserWarning,ignore::FutureWarning}
exec "$venv/bin/torchrun" --standalone --nproc-per-node "${NPROC:-2}" \
  -m megatron_internvl.training.demo "$@"
