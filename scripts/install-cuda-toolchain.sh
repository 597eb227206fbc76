#!/usr/bin/env bash
# Install the pinned CUDA 13.0 compiler (DESIGN.md §6) and libclang (for bindgen) from the
# Python package index into .toolchain/ at the repository root. build.rs looks there by itself,
# so after this script a plain `cargo build` compiles the kernels.
#
# All five nvidia packages are pinned: an unpinned nvidia-nvvm pulls a newer front end whose PTX
# CUDA 13.0's ptxas rejects.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ ! -x .toolchain/bin/pip ]; then
  "$py" -m venv .toolchain
fi
.toolchain/bin/pip install --quiet --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 libclang==18.1.1
nvcc=$(ls .toolchain/lib/python3*/site-packages/nvidia/cu13/bin/nvcc)
"$nvcc" --version | tail -2
echo "installed: $nvcc"
