#!/usr/bin/env bash
# Compile-checks every kernels/*.cu with NVRTC from the PyPI wheel (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
kernels=(kernels/*.cu)
if [ ${#kernels[@]} -eq 0 ]; then
    echo "check-kernels: kernels/ holds no .cu files yet; nothing to compile"
    exit 0
fi
python3 -m pip install -q "nvidia-cuda-nvrtc==13.0.88"
python3 scripts/nvrtc_check.py "${kernels[@]}"
