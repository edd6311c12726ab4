#!/usr/bin/env bash
# Demo: simulate a frame through a PSF, extract it, and compare with the truth.
# Uses the real DESI PSF in ../shared/data when present, else a synthetic one.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
export OPENBLAS_NUM_THREADS=1
cargo build --release
bin=target/release/spextract
out=${DEMO_DIR:-target/demo}
mkdir -p "$out"
psf=../shared/data/psf-r0-00067784.fits
if [ -f "$psf" ]; then
    echo "== using the real DESI r-camera PSF $psf"
else
    psf="$out/psf-synthetic.fits"
    echo "== ../shared/data not found: making a synthetic PSF $psf"
    "$bin" simulate --make-psf "$psf" --overwrite
fi
nspec=${DEMO_NSPEC:-125}
echo "== simulating fibers 0..$nspec on 5760-7620 A"
"$bin" simulate --psf "$psf" --image "$out/preproc.fits" --truth "$out/truth.fits" \
    --nspec "$nspec" --wavelength 5760,7620,0.8 --seed 1 --overwrite
echo "== extracting"
"$bin" extract --psf "$psf" --image "$out/preproc.fits" --output "$out/frame.fits" \
    --wavelength 5760,7620,0.8 --nspec "$nspec" --overwrite
echo "== comparing with the truth"
"$bin" compare "$out/frame.fits" --truth "$out/truth.fits"
