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
# differ. SPEXTRACT and CONFIG are passed on to the jobs. The jobs' #SBATCH lines set their
# size; CPU_SBATCH, GPU_SBATCH and REPORT_SBATCH add sbatch options to one job each (split at
# spaces), which override those lines:
#
#   CPU_SBATCH="--nodes=4 --time=4:00:00" GPU_SBATCH="--partition=gpu" FRAMES=... slurm/compare-cpu-gpu.sh
#
# Slurm is asked first whether it would run each job (sbatch --test-only); if it refuses one,
# nothing is submitted and OUTDIR is left as it was.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
FRAMES=${FRAMES:-frames.txt}
OUTDIR=${OUTDIR:-spextract-compare}
read -r -a cpu_opts <<<"${CPU_SBATCH:-}"
read -r -a gpu_opts <<<"${GPU_SBATCH:-}"
read -r -a report_opts <<<"${REPORT_SBATCH:-}"

fail() {
    echo "compare-cpu-gpu.sh: $*" >&2
    exit 2
}
[ -f "$FRAMES" ] || fail "FRAMES=$FRAMES: no such file"
command -v sbatch >/dev/null 2>&1 || fail "sbatch not found: run this on a Slurm login node"
# A job Slurm refuses (here: GPUs a cluster lacks, sizes beyond its nodes) is found before any
# job is submitted: otherwise the others would run, without a comparison to show for it.
would_run() { # $1: which job, $2: its variable, then sbatch's arguments
    local what=$1 var=$2 answer
    shift 2
    if ! answer=$(sbatch --test-only "$@" 2>&1); then
        fail "Slurm would not run the $what (sbatch --test-only $*): $answer;" \
            "nothing was submitted (set $var to adapt the job to this cluster)"
    fi
}
would_run "CPU job" CPU_SBATCH "${cpu_opts[@]}" "$here/cpu-node.sh"
would_run "GPU job" GPU_SBATCH "${gpu_opts[@]}" "$here/gpu-node.sh"
would_run "report job" REPORT_SBATCH "${report_opts[@]}" "$here/report.sh"
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

# Jobs submitted so far, cancelled if a later submission fails: a comparison missing a side is
# not worth the allocation.
submitted=()
submit() { # $1: which job, then sbatch's arguments; sets $id
    local what=$1 out
    shift
    # `set -e` does not reach into $(...): a failed sbatch is caught here.
    if ! out=$(sbatch --parsable --export=ALL "$@") || ! [[ ${out%%;*} =~ ^[0-9]+$ ]]; then
        if [ ${#submitted[@]} -gt 0 ]; then
            scancel "${submitted[@]}" || true
        fi
        fail "submitting the $what failed${out:+ (sbatch said: $out)}${submitted[*]:+; cancelled job(s) ${submitted[*]}}"
    fi
    id=${out%%;*} # sbatch --parsable may append ";cluster"
    submitted+=("$id")
}
FRAMES="$OUTDIR/frames-cpu.txt" REPORT="$OUTDIR/cpu.json" submit "CPU job" "${cpu_opts[@]}" "$here/cpu-node.sh"
cpu=$id
FRAMES="$OUTDIR/frames-gpu.txt" REPORT="$OUTDIR/gpu.json" submit "GPU job" "${gpu_opts[@]}" "$here/gpu-node.sh"
gpu=$id
# afterany, not afterok: a job stopped at its time limit still wrote its report, a run with
# failed frames exits non-zero but has a rate to compare, and a job that died at start-up
# leaves the other's row to show (the report marks the missing one).
CHART="$OUTDIR/compare.svg" submit "report job" "${report_opts[@]}" --dependency="afterany:$cpu:$gpu" \
    "$here/report.sh" "$OUTDIR/cpu.json" "$OUTDIR/gpu.json"
report=$id

echo "$nframes frames: CPU job $cpu, GPU job $gpu, report job $report"
echo "when they are done: $OUTDIR/compare.txt (frames per node-hour, GPU nodes against CPU" \
    "nodes) and $OUTDIR/compare.svg; by hand: spextract report $OUTDIR/cpu.json $OUTDIR/gpu.json --chart $OUTDIR/compare.svg"
