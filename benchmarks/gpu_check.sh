#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): purify on CUDA at default settings for 100 and 1,000
# classes, a CPU/CUDA ratio at 10 classes, and classify on onnxruntime's CPU and CUDA providers.
# Run from the repository root on a machine with a GPU: bash benchmarks/gpu_check.sh [OUT]
# Uses the python that holds a CUDA build of torch ($PYTHON, default python3). Packages it lacks
# (open_clip_torch, ftfy, ...) can be put as wheels in .whl/: they are installed to /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-gpu-check}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA device')"
exec "$PY" benchmarks/gpu_check.py --out "$OUT"
