#!/usr/bin/env bash
# spextract on CPU nodes: the frames of a list over MPI. On each node one rank reads and cuts
# frames, one writes them, and the others extract, each with --threads threads.
#
#   FRAMES=frames.txt OUTDIR=run-cpu sbatch slurm/cpu-node.sh
#
# Submit it again after a time limit or a failure: frames already complete are skipped.
# slurm/README.md says how to size it for other nodes.
#
# Slurm reads #SBATCH lines only up to the first command, so they all stay above it.
#SBATCH --job-name=spextract-cpu
#SBATCH --nodes=2
# Per node: 1 reader + 1 writer + 14 compute ranks, 8 cores each (a 128-core node). The two I/O
# ranks mostly wait on the file system; the more compute ranks per node, the smaller their
# share of the cores.
#SBATCH --ntasks-per-node=16
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
# SIGTERM to every rank about 120 s before the time limit (Slurm checks once a minute, so it
# may come up to 60 s earlier). spextract then hands out no more work, finishes or abandons the
# frames in flight without leaving a partial output, writes the report and exits before the
# SIGKILL at the limit: give it longer than one frame takes on one compute rank.
# No "B:" prefix: B:TERM@120 would signal only this batch shell, which is waiting for srun and
# would have to forward the signal itself; without it, Slurm signals the tasks of the running
# srun step, i.e. every spextract rank, directly.
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.out
# Site-specific, as needed: --account, --qos, --partition or --constraint (e.g. cpu).

set -euo pipefail

# The modules spextract was built with, in this order: module systems show an MPI build only
# once its compiler is loaded, and the application's module needs both. The names differ per
# centre (`module avail`): fill them in and uncomment.
# module load <compiler>
# module load <mpi>
# module load <spextract>

FRAMES=${FRAMES:-frames.txt}      # one `image psf output` triple per line
CONFIG=${CONFIG:-}                # a pipeline.toml; empty for the built-in defaults
OUTDIR=${OUTDIR:-spextract-run}   # the report and per-rank logs; frames go where FRAMES says
SPEXTRACT=${SPEXTRACT:-spextract} # the binary: a path, or a name on PATH (the module's)
REPORT=${REPORT:-$OUTDIR/cpu.json}
LABEL=${LABEL:-CPU nodes}

# Each spextract thread solves its own small patch systems through BLAS and LAPACK; a threaded
# BLAS would start threads of its own inside every one of them, on the same cores. OpenBLAS
# reads its variable when the library is loaded, before spextract runs, hence the environment.
export OMP_NUM_THREADS=1
export MKL_NUM_THREADS=1
export OPENBLAS_NUM_THREADS=1

if [ ! -f "$FRAMES" ]; then
    echo "cpu-node.sh: FRAMES=$FRAMES: no such file (run from the folder it is relative to)" >&2
    exit 2
fi
if ! command -v "$SPEXTRACT" >/dev/null 2>&1; then
    echo "cpu-node.sh: SPEXTRACT=$SPEXTRACT: not found (load its module or give the path)" >&2
    exit 2
fi
mkdir -p "$OUTDIR"
started=$(date +%s)

# --cpus-per-task is given to srun again because Slurm 22.05 and later no longer pass sbatch's
# value on to srun; --cpu-bind=cores then pins each rank to cores of its own.
rc=0
srun --cpu-bind=cores --cpus-per-task="$SLURM_CPUS_PER_TASK" \
    "$SPEXTRACT" extract --frames "$FRAMES" ${CONFIG:+--config "$CONFIG"} \
    --threads "$SLURM_CPUS_PER_TASK" --readers-per-node 1 --writers-per-node 1 --prefetch 2 \
    --backend cpu --report "$REPORT" --label "$LABEL" --log-dir "$OUTDIR/logs-$SLURM_JOB_ID" ||
    rc=$?

if [ -f "$REPORT" ] && [ "$(stat -c %Y "$REPORT")" -ge "$started" ] &&
    grep -q '"interrupted": true' "$REPORT"; then
    echo "cpu-node.sh: stopped before the time limit; submit the same job again to go on" \
        "(complete frames are skipped)" >&2
fi
exit "$rc"
