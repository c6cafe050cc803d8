#!/usr/bin/env bash
# The main job: a real, small InternVL pretraining run on 2 CPU ranks from the bundled demo data.
#   1. builds WebDataset shards from demo/ (photos shipped with scikit-image, hand-written Q&A)
#   2. trains a tiny InternVL (InternViT -> pixel shuffle -> MLP -> Qwen2-style LLM) with TP=2 + SP
#      (recipes/recipe/demo_cpu_shards.yaml), loss printed as it falls, checkpoints + TensorBoard
#   3. exports the last checkpoint to Hugging Face format (transformers' InternVL layout)
# Extra arguments are Hydra overrides for step 2, e.g. train.steps=20. RUN_ROOT (default runs)
# is where shards and the run directory go.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$root/.venv}
"$root/scripts/setup.sh"
cd "$root"
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::UserWarning,ignore::FutureWarning}
py="$venv/bin/python"
out=${RUN_ROOT:-runs}
run=$out/demo_cpu_shards

if [ ! -f "$out/demo_shards/shard-000000.idx" ]; then
  "$py" tools/build_shards.py --demo --out "$out/demo_shards" --no-progress
fi
# torchrun listening on 127.0.0.1 only (megatron_internvl/launch/local.py)
"$py" -m megatron_internvl.launch.local --standalone --nproc-per-node "${NPROC:-2}" \
  -m megatron_internvl.train recipe=demo_cpu_shards output_dir="$out" \
  "data.shards=[$out/demo_shards]" "$@"
"$py" tools/convert_hf.py to-hf --ckpt "$run/checkpoints" --out "$run/hf" --force

cat <<TXT

demo artefacts:
  shards        $out/demo_shards
  checkpoints   $run/checkpoints   (Megatron dist checkpoints, load at any TP/PP)
  tensorboard   $run/tensorboard   (tensorboard --logdir $run/tensorboard)
  config        $run/config.json
  HF export     $run/hf   (transformers InternVLForConditionalGeneration layout)
TXT
