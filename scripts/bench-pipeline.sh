#!/usr/bin/env bash
# Benchmark of the pipeline's I/O overlap (issue 3): the same 10 frames extracted twice in one
# process, first strictly sequentially (--prefetch 0: read, extract, write, then the next
# frame), then with one reader prefetching 2 frames and one writer beside the compute threads.
# Prints both summaries and their ratio (spextract report). Uses the real DESI PSF in
# ../shared/data when present, else a synthetic one.
# Env: BENCH_DIR (default target/bench-pipeline), NFRAMES (10), NSPEC (fibers lit, 100),
# THREADS (compute threads, 2).
set -euo pipefail
cd "$(dirname "$0")/.."
export OPENBLAS_NUM_THREADS=1
cargo build --release
bin=$PWD/target/release/spextract
dir=${BENCH_DIR:-target/bench-pipeline}
n=${NFRAMES:-10}
nspec=${NSPEC:-100}
threads=${THREADS:-2}
grid=5760,7620,0.8
mkdir -p "$dir"
cd "$dir"
psf=$(realpath -m ../../../shared/data/psf-r0-00067784.fits)
if [ ! -f "$psf" ]; then
    psf=$PWD/psf-synthetic.fits
    "$bin" simulate --make-psf "$psf" --overwrite
fi
: > frames.txt
for i in $(seq "$n"); do
    [ -f "preproc-$i.fits" ] || "$bin" simulate --psf "$psf" --image "preproc-$i.fits" \
        --truth "truth-$i.fits" --nspec "$nspec" --wavelength "$grid" --seed "$i" --overwrite
    echo "preproc-$i.fits $psf out/frame-$i.fits" >> frames.txt
done
printf '[extract]\nwavelength = [5760.0, 7620.0, 0.8]\nnspec = %s\n' "$nspec" > bench.toml
for mode in sequential overlap; do
    prefetch=2
    [ "$mode" = sequential ] && prefetch=0
    rm -rf out
    echo "== $mode (--prefetch $prefetch), $n frames of $nspec fibers, $threads compute threads"
    "$bin" extract --frames frames.txt --config bench.toml --threads "$threads" \
        --prefetch "$prefetch" --report "$mode.json" --label "$mode" 2>&1 | grep -v ' INFO '
done
"$bin" report sequential.json overlap.json
