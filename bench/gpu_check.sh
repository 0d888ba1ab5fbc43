#!/usr/bin/env bash
# The GPU check, one command on a machine with one CUDA GPU, from the repository root:
#   bash bench/gpu_check.sh [OUTPUT_DIR]        (default: $OUT, else gpu-check)
# It installs the package (and, from .whl/, the wheels bench/gpu_wheels.sh downloaded for a machine without a network
# whose Python has PyTorch but not diffusers, datasets or evaluate), then runs bench/gpu_paths.py: the paths that
# change on a CUDA device (EMA, heads and kNN on the device, half precision, CPU offload), each once, with what they
# measure, into OUTPUT_DIR/gpu_paths.json. Exits non-zero if a path failed.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 \
  || { echo "gpu_check: installing the package failed (see $out/install.log)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt" || true
PYTHONUNBUFFERED=1 python3 bench/gpu_paths.py --output_dir "$out" 2>&1 | tee "$out/gpu_paths.log"
