#!/usr/bin/env bash
# Downloads, into .whl/, the wheels that bench/gpu_check.sh installs on a GPU machine whose Python has PyTorch,
# transformers, accelerate, peft and the scientific stack but not diffusers, datasets or evaluate, and no network.
# Run it here (where pip reaches the package index), from the repository root; .whl/ is ignored by git.
set -euo pipefail
cd "$(dirname "$0")/.."
python_version="${GPU_PYTHON_VERSION:-3.12}"
mkdir -p .whl
for spec in diffusers==0.42.1 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 \
            importlib_metadata==10.2.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec"
done
ls -la .whl
