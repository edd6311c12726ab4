#!/usr/bin/env bash
# Installs the system packages spextract builds against, when any is missing (Debian/Ubuntu):
# a C toolchain (Rust links with it), pkg-config, cfitsio, OpenBLAS, Open MPI, and libclang
# with its compiler headers (bindgen generates the MPI bindings from mpi.h).
# Rust itself is a prerequisite: install it with rustup (https://rustup.rs).
set -euo pipefail
if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "deps: not a Debian/Ubuntu system; install a C compiler, pkg-config, cfitsio, OpenBLAS," \
        "Open MPI and libclang yourself" >&2
else
    have() { dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q "install ok installed"; }
    missing=()
    for p in build-essential pkg-config libcfitsio-dev libopenblas-dev libopenmpi-dev openmpi-bin; do
        have "$p" || missing+=("$p")
    done
    # Any installed libclang will do, if its headers (stddef.h) are there too; libclang-dev
    # brings the distribution's default version with them.
    if ! compgen -G "/usr/lib/llvm-*/lib/libclang*.so*" >/dev/null ||
        ! compgen -G "/usr/lib/llvm-*/lib/clang/*/include/stddef.h" >/dev/null; then
        missing+=(libclang-dev)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        echo "deps: installing ${missing[*]}" >&2
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
    fi
fi
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    echo "deps: cargo is installed but not on PATH; run: source \"\$HOME/.cargo/env\"" >&2
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "deps: cargo not found: install Rust with rustup (https://rustup.rs), then re-run" >&2
    exit 1
fi
