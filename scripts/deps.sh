#!/usr/bin/env bash
# Installs the system packages spextract builds against, when any is missing (Debian/Ubuntu).
set -euo pipefail
pkgs=(libopenmpi-dev openmpi-bin libclang1-14 libclang-common-14-dev libcfitsio-dev libopenblas-dev pkg-config)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust from https://rustup.rs (stable toolchain) and re-run" >&2
    exit 1
fi
