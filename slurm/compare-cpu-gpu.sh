#!/usr/bin/env bash
# Frames per node-hour on CPU nodes against GPU nodes: submits cpu-node.sh and gpu-node.sh on
# the same frames, and report.sh to compare their reports when both have ended. Run it on a
# login node, not with sbatch:
#
#   FRAMES=frames.txt OUTDIR=compare slurm/compare-cpu-gpu.sh
#
# Each job writes its frames under OUTDIR (cpu/ and gpu/), not where FRAMES says: with the same
# outputs the faster job would find the other's frames complete and skip them, and neither
# rate would mean anything. Frames are named by the base name of their output, so those must
# differ. SPEXTRACT and CONFIG are passed on to the jobs; the jobs' #SBATCH lines set their size.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
FRAMES=${FRAMES:-frames.txt}
OUTDIR=${OUTDIR:-spextract-compare}

fail() {
    echo "compare-cpu-gpu.sh: $*" >&2
    exit 2
}
[ -f "$FRAMES" ] || fail "FRAMES=$FRAMES: no such file"
command -v sbatch >/dev/null 2>&1 || fail "sbatch not found: run this on a Slurm login node"
# A folder of an earlier comparison holds frames the new jobs would skip, or jobs still running.
if [ -n "$(ls -A "$OUTDIR" 2>/dev/null)" ]; then
    fail "OUTDIR=$OUTDIR is not empty: choose a new folder for each comparison"
fi
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
export OUTDIR # the jobs' too

# The same frames with each output moved under OUTDIR/<side>/. Paths in a list are relative to
# its folder, so they are made absolute to stay valid in OUTDIR.
listdir=$(cd "$(dirname "$FRAMES")" && pwd)
for side in cpu gpu; do
    mkdir -p "$OUTDIR/$side"
    awk -v listdir="$listdir" -v outdir="$OUTDIR/$side" -v list="$FRAMES" '
        function abs(p) { return substr(p, 1, 1) == "/" ? p : listdir "/" p }
        {
            n = 0
            for (i = 1; i <= NF && substr($i, 1, 1) != "#"; i++) f[++n] = $i
            if (n == 0) next
            if (n != 3) {
                printf "compare-cpu-gpu.sh: %s line %d: expected `image psf output`, found %d fields\n", list, FNR, n > "/dev/stderr"
                exit 2
            }
            name = f[3]
            sub(/.*\//, "", name)
            if (name in seen) {
                printf "compare-cpu-gpu.sh: %s lines %d and %d: both outputs are named %s\n", list, seen[name], FNR, name > "/dev/stderr"
                exit 2
            }
            seen[name] = FNR
            print abs(f[1]), abs(f[2]), outdir "/" name
        }' "$FRAMES" >"$OUTDIR/frames-$side.txt"
done
nframes=$(wc -l <"$OUTDIR/frames-cpu.txt")
[ "$nframes" -gt 0 ] || fail "$FRAMES lists no frames"

submit() { # prints the job id; sbatch --parsable may append ";cluster"
    local id
    id=$(sbatch --parsable --export=ALL "$@")
    echo "${id%%;*}"
}
cpu=$(FRAMES="$OUTDIR/frames-cpu.txt" REPORT="$OUTDIR/cpu.json" submit "$here/cpu-node.sh")
gpu=$(FRAMES="$OUTDIR/frames-gpu.txt" REPORT="$OUTDIR/gpu.json" submit "$here/gpu-node.sh")
# afterany, not afterok: a job stopped at its time limit still wrote its report, and a run with
# failed frames exits non-zero but has a rate to compare.
report=$(CHART="$OUTDIR/compare.svg" \
    submit --dependency="afterany:$cpu:$gpu" "$here/report.sh" "$OUTDIR/cpu.json" "$OUTDIR/gpu.json")

echo "$nframes frames: CPU job $cpu, GPU job $gpu, report job $report"
echo "when they are done: $OUTDIR/compare.txt (frames per node-hour, GPU nodes against CPU" \
    "nodes) and $OUTDIR/compare.svg; by hand: spextract report $OUTDIR/cpu.json $OUTDIR/gpu.json --chart $OUTDIR/compare.svg"
