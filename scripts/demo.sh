#!/usr/bin/env bash
# Demo: builds spextract, simulates 125 fibers (5 bundles) through a PSF, extracts them and
# compares the result with the truth. Uses the real DESI r-camera PSF in ../shared/data when
# present (unless DEMO_PSF=synthetic), else a synthetic one. Files go to target/demo (DEMO_DIR
# to change); DEMO_NSPEC sets the number of fibers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
export OPENBLAS_NUM_THREADS=1
[ -t 2 ] || export NO_COLOR=1
cargo build --release
bin=target/release/spextract
out=${DEMO_DIR:-target/demo}
nspec=${DEMO_NSPEC:-125}
grid=5760,7620,0.8
mkdir -p "$out"
psf=../shared/data/psf-r0-00067784.fits
if [ "${DEMO_PSF:-}" = synthetic ]; then
    psf="$out/psf-synthetic.fits"
    echo "== PSF: a synthetic r-camera PSF $psf (DEMO_PSF=synthetic)"
    "$bin" simulate --make-psf "$psf" --overwrite
elif [ -f "$psf" ]; then
    echo "== PSF: the real DESI r-camera PSF $psf"
else
    psf="$out/psf-synthetic.fits"
    echo "== PSF: ../shared/data not found; making a synthetic r-camera PSF $psf"
    "$bin" simulate --make-psf "$psf" --overwrite
fi
echo "== simulating fibers 0..$nspec on $grid (Poisson + read noise, cosmics, bad pixels)"
"$bin" simulate --psf "$psf" --image "$out/preproc.fits" --truth "$out/truth.fits" \
    --nspec "$nspec" --wavelength "$grid" --seed 1 --overwrite
echo "== extracting"
start=$(date +%s%N)
"$bin" extract --psf "$psf" --image "$out/preproc.fits" --output "$out/frame.fits" \
    --wavelength "$grid" --nspec "$nspec" --overwrite
ms=$((($(date +%s%N) - start) / 1000000))
echo "== comparing with the truth"
status=0
"$bin" compare "$out/frame.fits" --truth "$out/truth.fits" || status=$?
printf '== %s fibers extracted and written in %d.%01d s on %s cores; frame: %s\n' \
    "$nspec" $((ms / 1000)) $((ms % 1000 / 100)) "$(nproc)" "$out/frame.fits"
if [ "$status" -eq 0 ]; then
    echo "== demo passed: every figure is within its threshold"
else
    echo "== demo FAILED: see the FAIL lines above" >&2
fi
exit "$status"
