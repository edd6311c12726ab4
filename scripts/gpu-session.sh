#!/usr/bin/env bash
# Stages what a GPU machine without Rust needs to run the GPU checks (scripts/gpu-remote.sh)
# into .gpu/ (ignored, never committed):
#   .gpu/bin/spextract             the release binary, debug info stripped (symbols kept)
#   .gpu/bin/spextract-lib-tests   the release unit-test binary of the library, likewise
#   .gpu/lib.tar.gz                every shared library they load that is not glibc, libgcc_s
#                                  or the CUDA driver (OpenBLAS, cfitsio and libcurl's tree,
#                                  OpenMPI's libmpi/open-rte/open-pal, hwloc, gfortran, ...)
#   .gpu/data/                     the shared test data: PSF, preproc of bundle 0 (read by the
#                                  GPU tests), gpu_specter's frame and the truth (gzipped)
#   .gpu/MANIFEST                  commit, build time, libraries with their Debian packages
#   .gpu/bin/spextract-cuda-aware  when GPU_CUDA_MPI names a CUDA-aware Open MPI's install tree
#   .gpu/ompi.tar.gz               (scripts/build-cuda-aware-ompi.sh makes one): the release
#                                  binary built with --features cuda-aware-mpi against it, and
#                                  the tree itself (no headers or manuals; with the non-glibc
#                                  libraries it loads), which gpu-remote.sh runs with OPAL_PREFIX
#   .gpu/sidebyside/               when GPU_SIDEBYSIDE names a folder: a copy of it, whose run.sh
#                                  gpu-remote.sh runs as `run.sh PSF PREPROC DIR` to extract the
#                                  full frame with another extractor into DIR/frame-other.fits
#                                  (e.g. gpu_specter with its wheels, kept outside the repository)
# The full 500-fiber frame of the benchmark is not staged (a full-CCD preproc is ~140 MB):
# gpu-remote.sh simulates it there with the staged binary.
# Then, with the device tool: run(command="bash scripts/gpu-remote.sh", carry=[".gpu"]).
# Fails if .gpu/ exceeds GPU_STAGE_MAX_MIB (default 60; the tool carries 64 MiB in all,
# working tree included).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
stage=$root/.gpu
data_src=${SPEXTRACT_TEST_DATA:-$root/../shared/data}
max_mib=${GPU_STAGE_MAX_MIB:-60}

# Keep .gpu/ out of git (also in a fresh clone whose .gitignore lacks it).
if ! git check-ignore -q .gpu/x 2>/dev/null; then
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    echo "/.gpu/" >>"$exclude"
    echo "gpu-session: added /.gpu/ to $exclude"
fi

echo "== building (release binary and library unit tests)"
export OPENBLAS_NUM_THREADS=1
cargo build --release
json=$(mktemp)
trap 'rm -f "$json"' EXIT
if ! cargo test --release --lib --no-run --message-format=json >"$json"; then
    cargo test --release --lib --no-run # again, for readable errors
    exit 1
fi
lib_tests=$(python3 - "$json" <<'PY'
import json, sys
exe = ""
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if (m.get("reason") == "compiler-artifact" and m.get("executable")
            and m["profile"]["test"] and "lib" in m["target"]["kind"]):
        exe = m["executable"]
print(exe)
PY
)
bin=${CARGO_TARGET_DIR:-target}/release/spextract
[ -x "$bin" ] || { echo "gpu-session: $bin was not built" >&2; exit 1; }
if [ -z "$lib_tests" ] || [ ! -x "$lib_tests" ]; then
    echo "gpu-session: cargo did not report the library's test executable" >&2
    exit 1
fi

echo "== staging into .gpu/"
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/data" "$stage/lib"
objcopy --strip-debug "$bin" "$stage/bin/spextract"
objcopy --strip-debug "$lib_tests" "$stage/bin/spextract-lib-tests"

# Shared libraries: everything ldd resolves, under the name the binaries ask for (the soname),
# except glibc's own libraries, libgcc_s/libstdc++ (every Linux has them, and glibc's parts
# must match the loader there) and the NVIDIA driver's.
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libmvec|libpthread|libdl\.so|librt\.so|libresolv|libutil\.so|libanl|libnsl|libBrokenLocale|libgcc_s|libstdc\+\+|libcuda\.so|libnvidia-)'
missing=0
while read -r name path; do
    if [[ "$name" =~ $skip ]]; then continue; fi
    if [ "$path" = "not" ] || [ ! -e "$path" ]; then
        echo "gpu-session: $name is not found here" >&2
        missing=1
        continue
    fi
    cp -L "$path" "$stage/lib/$name"
    real=$(readlink -f "$path")
    pkg=$({ dpkg -S "$real" || dpkg -S "${real#/usr}"; } 2>/dev/null | head -1 | cut -d: -f1 || true)
    printf '  %-28s %-28s %s\n' "$name" "${pkg:-?}" "$real" >>"$stage/libs.txt"
done < <(ldd "$stage/bin/spextract" "$stage/bin/spextract-lib-tests" |
    awk '$2 == "=>" { print $1, $3 }' | sort -u)
[ "$missing" = 0 ] || exit 1

# Shared test data (never copied into tracked files: .gpu/ is ignored).
for f in psf-r0-00067784.fits preproc-r0-b00.fits.gz; do
    if [ -f "$data_src/$f" ]; then
        cp "$data_src/$f" "$stage/data/$f"
    else
        echo "gpu-session: warning: $data_src/$f is missing; the GPU tests that need it will skip" >&2
    fi
done
for f in frame-r0-b00-gpu_specter.fits truth-r0-b00.fits; do
    if [ -f "$data_src/$f" ]; then
        gzip -9c "$data_src/$f" >"$stage/data/$f.gz"
    else
        echo "gpu-session: warning: $data_src/$f is missing; the parity step will skip it" >&2
    fi
done

if [ -n "${GPU_CUDA_MPI:-}" ]; then
    ompi=$GPU_CUDA_MPI
    "$ompi/bin/ompi_info" --parsable --all | grep -q 'mpi_built_with_cuda_support:value:true' || {
        echo "gpu-session: $ompi is not a CUDA-aware Open MPI (scripts/build-cuda-aware-ompi.sh)" >&2
        exit 1
    }
    echo "== building the cuda-aware-mpi binary against $ompi"
    PATH=$ompi/bin:$PATH cargo build --release --features cuda-aware-mpi --target-dir target/cuda-aware
    objcopy --strip-debug target/cuda-aware/release/spextract "$stage/bin/spextract-cuda-aware"
    tree=$(mktemp -d)
    cp -a "$ompi/." "$tree/"
    rm -rf "$tree/include" "$tree/share/man" "$tree/share/doc"
    find "$tree" -name '*.la' -delete
    find "$tree" -type f -perm -u+x -o -type f -name '*.so*' | while read -r f; do
        strip --strip-unneeded "$f" 2>/dev/null || true
    done
    # What the tree loads from the system besides glibc and the driver goes with it.
    # (ldd fails on the scripts among the executables: its status is not the point here.)
    { find "$tree" -type f \( -name '*.so*' -o -perm -u+x \) -exec ldd {} + 2>/dev/null || true; } |
        awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }' | sort -u | while read -r name path; do
        if [[ "$name" =~ $skip ]] || [[ "$path" == "$ompi"* ]] || [ -e "$tree/lib/$name" ]; then continue; fi
        cp -L "$path" "$tree/lib/$name"
        echo "  ompi.tar.gz: + $name ($path)"
    done
    tar -C "$tree" -czf "$stage/ompi.tar.gz" .
    rm -rf "$tree"
    echo "  cuda-aware: $("$ompi/bin/ompi_info" | grep -m1 'Open MPI:' | xargs) from $ompi" >>"$stage/libs.txt"
fi

if [ -n "${GPU_SIDEBYSIDE:-}" ]; then
    [ -f "$GPU_SIDEBYSIDE/run.sh" ] || { echo "gpu-session: $GPU_SIDEBYSIDE/run.sh is missing" >&2; exit 1; }
    cp -r "$GPU_SIDEBYSIDE" "$stage/sidebyside"
fi

{
    echo "commit   $(git rev-parse --short HEAD)$([ -z "$(git status --porcelain -- src kernels tests Cargo.toml Cargo.lock build.rs)" ] || echo ' + uncommitted changes')"
    echo "staged   $(date -u +%FT%TZ) on $(hostname)"
    echo "rustc    $(rustc --version)"
    echo "glibc    $(ldd --version | head -1)  (the GPU machine needs this version or newer)"
    echo "binaries spextract <- $bin; spextract-lib-tests <- $lib_tests"
    echo "libraries (soname, Debian package, file here):"
    cat "$stage/libs.txt"
} >"$stage/MANIFEST"
rm "$stage/libs.txt"

# The libraries travel as one tarball (OpenBLAS alone is 36 MB, 11 MB gzipped);
# gpu-remote.sh unpacks it outside the tree.
tar -C "$stage" -czf "$stage/lib.tar.gz" lib
rm -rf "${stage:?}/lib"

cat "$stage/MANIFEST"
du -ab "$stage" | sort -k2 | awk '{ printf "%10.1f MiB  %s\n", $1 / 1048576, $2 }'
bytes=$(du -sb "$stage" | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null |
    tail -1 | cut -f1)
awk -v s="$bytes" -v t="$tree" 'BEGIN { printf "== .gpu/ holds %.1f MiB; with the working tree (%.1f MiB) %.1f MiB travel (limit 64 MiB)\n", s / 1048576, t / 1048576, (s + t) / 1048576 }'
if [ "$bytes" -gt $((max_mib * 1048576)) ]; then
    echo "gpu-session: .gpu/ is over ${max_mib} MiB" >&2
    exit 1
fi
echo "== next: the device tool's run with command 'bash scripts/gpu-remote.sh' and carry [\".gpu\"]"
