#!/usr/bin/env bash
# Build Transformer Engine's PyTorch extension on a machine WITH network (no GPU needed, nvcc
# needed) for GPU nodes WITHOUT network, and gather every wheel those nodes need.
#
#   tools/build_te_offline.sh OUT_DIR [PYTHON] [TORCH_VERSION] [TE_VERSION]
#   e.g. tools/build_te_offline.sh te_wheels python3.12 2.11.0 2.20.2
#
# PYTHON and TORCH_VERSION must be the GPU nodes' (python -c 'import torch; print(torch.__version__)'
# there, without the +cu suffix): the extension is compiled against that exact torch ABI. PyPI's
# torch for Linux x86-64 is the CUDA 13 build, the same as on the nodes. CUDA_HOME must hold nvcc
# of the same CUDA major version (default /usr/local/cuda). Takes about 8 minutes on 2 cores.
# On the node: pip install --no-index --no-deps OUT_DIR/*.whl (into the environment holding torch).
set -euo pipefail
OUT=${1:?usage: build_te_offline.sh OUT_DIR [PYTHON] [TORCH_VERSION] [TE_VERSION]}
PYTHON=${2:-python3}
TORCH_VERSION=${3:-2.11.0}
TE_VERSION=${4:-2.20.2}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "no nvcc under CUDA_HOME=$CUDA_HOME: install the CUDA toolkit or set CUDA_HOME" >&2; exit 2; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/pip"
"$PIP" install -q --upgrade pip
"$PIP" install -q "torch==$TORCH_VERSION" "transformer_engine_cu13==$TE_VERSION" "transformer_engine==$TE_VERSION" \
  pybind11 ninja wheel "setuptools<82" packaging "nvidia-cudnn-frontend>=1.29" einops onnx onnxscript \
  nvdlfw-inspect pydantic importlib-metadata

# The extension ships as an sdist only, and `pip download --no-binary` would build it (and refuse
# a prebuilt torch): fetch the sdist through the index's JSON simple API, checking its hash.
# The index: PIP_INDEX_URL, else pip's configured index-url, else pip's own default.
INDEX=${PIP_INDEX_URL:-$("$PIP" config get global.index-url 2>/dev/null || true)}
"$WORK/venv/bin/python" - "$TE_VERSION" "$WORK/sdist" "$INDEX" <<'EOF'
import hashlib, json, os, sys, urllib.request
version, dest, index = sys.argv[1], sys.argv[2], sys.argv[3]
if not index:
    from pip._internal.models.index import PyPI
    index = PyPI.simple_url
index = index.rstrip("/")
accept = {"Accept": "application/vnd.pypi.simple.v1+json"}
request = urllib.request.Request(f"{index}/transformer-engine-torch/", headers=accept)
files = json.load(urllib.request.urlopen(request))["files"]
wanted = f"transformer_engine_torch-{version}.tar.gz"
entry = next(f for f in files if f["filename"] == wanted)
os.makedirs(dest, exist_ok=True)
path = os.path.join(dest, wanted)
urllib.request.urlretrieve(entry["url"], path)
digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
assert digest == entry["hashes"]["sha256"], f"{wanted}: sha256 {digest} is not the index's"
print(f"fetched {wanted} (sha256 ok)")
EOF

# NVTE_PYTORCH_FORCE_BUILD skips a prebuilt-wheel download that cannot match; the NVIDIA pip
# packages provide the cuBLAS/NCCL/cuDNN headers; the pip CUDA headers lack crt/, hence the
# toolkit's include path.
NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_NO_LOCAL_VERSION=1 NVTE_BUILD_USE_NVIDIA_WHEELS=1 \
  NVTE_FRAMEWORK=pytorch MAX_JOBS=${MAX_JOBS:-2} CPLUS_INCLUDE_PATH="$CUDA_HOME/include" \
  "$PIP" wheel --no-build-isolation --no-deps -w "$OUT" "$WORK"/sdist/transformer_engine_torch-*.tar.gz

"$PIP" download -q --no-deps -d "$OUT" "transformer_engine_cu13==$TE_VERSION" \
  "transformer_engine==$TE_VERSION" nvdlfw-inspect pydantic pydantic-core annotated-types \
  typing-inspection importlib-metadata
# Proof that the wheel matches the torch ABI: install it here and import it (no GPU needed).
"$PIP" install -q --no-deps "$OUT"/transformer_engine_torch-"$TE_VERSION"-*.whl
"$WORK/venv/bin/python" -c "import torch, transformer_engine.pytorch" \
  || { echo "the built extension does not import against torch $TORCH_VERSION" >&2; exit 1; }
echo "the extension imports against torch $TORCH_VERSION"
ls -la "$OUT"
