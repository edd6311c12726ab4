#!/usr/bin/env bash
# Compile-checks every kernels/*.cu with NVRTC from the PyPI wheel (no GPU needed): first with
# a small Python driver of libnvrtc, then through the binary's own path (cudarc's NVRTC, the
# include expansion and the PTX cache) in the `extract::gpu::ptx` tests.
# Pinned to 13.0.x: the GPUs we run on have driver 580 (CUDA 13.0), which loads PTX only up to
# ISA 9.0.
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
libdir=$(python3 - <<'PY'
import glob, os, nvidia
libs = [l for root in nvidia.__path__
        for l in glob.glob(os.path.join(root, "cu*", "lib", "libnvrtc.so.*")) if ".alt." not in l]
print(os.path.dirname(sorted(libs)[0]) if libs else "")
PY
)
if [ -z "$libdir" ]; then
    echo "check-kernels: libnvrtc not found in the wheel" >&2
    exit 1
fi
export OPENBLAS_NUM_THREADS=1
LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" SPEXTRACT_REQUIRE_NVRTC=1 \
    cargo test --release --lib extract::gpu::ptx
