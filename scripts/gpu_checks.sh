#!/usr/bin/env bash
# Every GPU-only check of the project in one unattended run on one H100/H200 (about 9 minutes):
# the gpu-marked tests (TE == local in bf16, FP8, THD, DALI mixed decode, platform inert), the
# training-step benchmark against transformers (LLM MFU, FP8 speed-up, whole InternVL step),
# FP8-vs-bf16 loss curves through the training loop, and the data pipeline's GPU decode.
# Needs the gpu extra installed (Transformer Engine, DALI's CUDA wheel; README "GPU runs").
# Results: $OUT (default ./gpu_results). Each step has its own time limit, so one hang or
# failure costs only its own step.
#   scripts/gpu_checks.sh                       # every step
#   scripts/gpu_checks.sh pytest_gpu bench_llm  # only these
set -u
ONLY=" $* "
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore CUDA_DEVICE_MAX_CONNECTIONS=1
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run, keep the log, note the outcome
  local name=$1 limit=$2
  shift 2
  if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then return; fi
  local began=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$(date +%T) $name rc=$rc $((SECONDS - began))s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"
"$PY" -c "import torch, transformer_engine as te; print('torch', torch.__version__, 'TE', te.__version__)" \
  | tee -a "$OUT/summary.txt"

step pytest_gpu 90 "$PY" -m pytest -q -m gpu --timeout 120 \
  tests/test_te_gpu.py tests/test_backends.py tests/test_cpu_platform.py \
  tests/test_data_dali.py tests/test_data_loader.py

# LLM of an 8B-class stack (InternLM2.5-7B widths, 8 of its 32 layers), 8192 packed tokens.
step bench_llm 110 "$PY" benchmarks/train_step.py --flavour internvl2_5_8b --part llm \
  --llm-layers 8 --seq-length 8192 --samples-per-row 4 \
  --precision bf16,fp8-tensorwise,fp8-delayed --warmup 2 --steps 5 --profile

# Three runs at once on the one GPU (alone, bf16 took ~150 s for 200 steps on an H200).
step fp8_convergence 240 "$PY" benchmarks/fp8_convergence.py \
  --variants bf16,fp8-delayed,fp8-tensorwise --backend te --flavour internvl2_5_1b \
  --llm-layers 4 --vit-layers 4 --seq-length 1024 --steps 200 --parallel \
  --out /tmp/fp8_convergence
cp /tmp/fp8_convergence/curves.csv "$OUT/fp8_curves.csv" 2>/dev/null

# The whole InternVL step: InternViT-300M (24 layers) + 8 LLM layers, 4 x 2048-token samples
# with 2 tiles each.
step bench_internvl 90 "$PY" benchmarks/train_step.py --flavour internvl2_5_8b --part internvl \
  --llm-layers 8 --seq-length 8192 --samples-per-row 4 --tiles-per-sample 2 \
  --precision bf16,fp8-tensorwise --warmup 2 --steps 5

if [ -f benchmarks/data_throughput.py ]; then
  step data_gpu 90 "$PY" benchmarks/data_throughput.py --device gpu --samples 120 --repeats 1
fi
cat "$OUT/summary.txt"
