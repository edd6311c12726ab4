#!/usr/bin/env bash
# Benchmark of --ivar-from-model (issue 14, item 1): one frame whose IVAR was computed from its
# own pixels (simulate --ivar-from-data), extracted alternately with one pass (the default) and
# with --ivar-from-model (two passes), REPEATS times each, end to end (reading and writing
# included). Prints each run's wall time, the ratio of the totals, and each frame against the
# truth. Then the same for a list of LIST_FRAMES frames through the pipeline (one process, or
# mpirun -n RANKS when RANKS is set), where the first pass's model goes back to the reader.
# Uses the real DESI PSF in ../shared/data when present, else a synthetic one.
# Env: BENCH_DIR (default target/bench-ivar-model), NSPEC (fibers, 50), THREADS (2),
# REPEATS (3), LIST_FRAMES (4; 0 skips the list), RANKS (unset: one process), BACKEND
# (--backend of every extraction; unset: the default, auto), SPEXTRACT_BIN (a built binary,
# e.g. the one scripts/gpu-session.sh stages; unset: cargo builds target/release), PSF (a PSF
# file instead of the shared or synthetic one).
set -euo pipefail
cd "$(dirname "$0")/.."
export OPENBLAS_NUM_THREADS=1
if [ -n "${SPEXTRACT_BIN:-}" ]; then
    bin=$(realpath "$SPEXTRACT_BIN")
else
    cargo build --release
    bin=$PWD/target/release/spextract
fi
backend=()
[ -z "${BACKEND:-}" ] || backend=(--backend "$BACKEND")
dir=${BENCH_DIR:-target/bench-ivar-model}
nspec=${NSPEC:-50}
threads=${THREADS:-2}
repeats=${REPEATS:-3}
grid=5760,7620,0.8
psf=$(realpath -m "${PSF:-../shared/data/psf-r0-00067784.fits}")
mkdir -p "$dir"
cd "$dir"
if [ ! -f "$psf" ]; then
    psf=$PWD/psf-synthetic.fits
    "$bin" simulate --make-psf "$psf" --overwrite
fi
echo "== simulating $nspec fibers on $grid with IVAR from the pixels (PSF $psf)"
"$bin" simulate --psf "$psf" --image preproc.fits --truth truth.fits --nspec "$nspec" \
    --wavelength "$grid" --seed 1 --ivar-from-data --overwrite 2>/dev/null
# Its log's last lines on stderr, and a failure, when an extraction failed.
failed() {
    echo "bench-ivar-model: $1 failed; its log ends:" >&2
    tail -5 "$2" >&2
    return 1
}
# Wall milliseconds of one extraction with the given extra flags (its log in $out.log).
run() {
    local out=$1 start end
    shift
    start=$(date +%s%N)
    "$bin" extract -p "$psf" -i preproc.fits -o "$out" -w "$grid" -n "$nspec" \
        --threads "$threads" --no-progress --overwrite "${backend[@]}" "$@" 2>"$out.log" ||
        failed "extract -o $out $*" "$out.log" || return 1
    end=$(date +%s%N)
    echo $(((end - start) / 1000000))
}
one=0
two=0
for i in $(seq "$repeats"); do
    a=$(run one-pass.fits) || exit 1
    b=$(run two-pass.fits --ivar-from-model) || exit 1
    printf '  run %d: one pass %d ms, --ivar-from-model %d ms\n' "$i" "$a" "$b"
    one=$((one + a))
    two=$((two + b))
done
printf '== --ivar-from-model / one pass: %d.%03d (%d ms / %d ms over %d runs each, %s threads%s)\n' \
    $((two / one)) $((two * 1000 / one % 1000)) "$two" "$one" "$repeats" "$threads" \
    "${BACKEND:+, backend $BACKEND}"
# Where the device time went (a GPU backend logs its stages), in each kind's last run.
grep -h "device seconds by stage" one-pass.fits.log two-pass.fits.log || true
for f in one-pass two-pass; do
    echo "== $f.fits against the truth"
    "$bin" compare "$f.fits" --truth truth.fits | grep -E 'chi2/dof|mean pull' || true
done

frames=${LIST_FRAMES:-4}
[ "$frames" -gt 0 ] || exit 0
echo "== a list of $frames frames (seeds 1..$frames)${RANKS:+ under mpirun -n $RANKS}"
: >list.txt
for i in $(seq "$frames"); do
    "$bin" simulate --psf "$psf" --image "preproc-$i.fits" --truth "truth-$i.fits" \
        --nspec "$nspec" --wavelength "$grid" --seed "$i" --ivar-from-data --overwrite 2>/dev/null
    echo "preproc-$i.fits $psf OUT/frame-$i.fits" >>list.txt
done
printf '[extract]\nwavelength = [%s]\nnspec = %d\n' "$grid" "$nspec" >run.toml
launch=()
if [ -n "${RANKS:-}" ]; then
    launch=(mpirun -n "$RANKS")
fi
# Wall seconds of the list with the given extra flags, into folder $1.
run_list() {
    local out=$1 start end
    shift
    rm -rf "$out"
    sed "s|OUT/|$out/|" list.txt >"list-$out.txt"
    start=$(date +%s%N)
    "${launch[@]}" "$bin" extract --frames "list-$out.txt" --config run.toml \
        --threads "$threads" --no-progress "${backend[@]}" "$@" 2>"$out.log" ||
        failed "the list into $out $*" "$out.log" || return 1
    end=$(date +%s%N)
    echo $(((end - start) / 1000000))
}
one=0
two=0
for i in $(seq "$repeats"); do
    a=$(run_list list-one-pass) || exit 1
    b=$(run_list list-two-pass --ivar-from-model) || exit 1
    printf '  run %d: one pass %d ms, --ivar-from-model %d ms\n' "$i" "$a" "$b"
    one=$((one + a))
    two=$((two + b))
done
printf '== list: --ivar-from-model / one pass: %d.%03d (%d ms / %d ms over %d runs each)\n' \
    $((two / one)) $((two * 1000 / one % 1000)) "$two" "$one" "$repeats"
echo "== list frame 1 against the single frame's two passes"
"$bin" compare list-two-pass/frame-1.fits two-pass.fits --max-pull 1e-6 | grep -E 'max pull|ivar' || true
