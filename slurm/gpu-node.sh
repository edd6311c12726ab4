#!/usr/bin/env bash
# spextract on GPU nodes: the frames of a list over MPI. On each node one rank reads and cuts
# frames, one writes them, and one compute rank per GPU extracts.
#
#   FRAMES=frames.txt OUTDIR=run-gpu sbatch slurm/gpu-node.sh
#
# Submit it again after a time limit or a failure: frames already complete are skipped.
# slurm/README.md says how to size it for other nodes.
#
# Slurm reads #SBATCH lines only up to the first command, so they all stay above it.
#SBATCH --job-name=spextract-gpu
#SBATCH --nodes=2
#SBATCH --gpus-per-node=4
# Per node: one compute rank per GPU + 1 reader + 1 writer, i.e. GPUs + 2.
#SBATCH --ntasks-per-node=6
# 6 x 10 of a 64-core node. A GPU rank's threads prepare its patches (spots, staging) while the
# GPU solves, so they are not idle cores.
#SBATCH --cpus-per-task=10
#SBATCH --time=01:00:00
# SIGTERM to every rank about 120 s before the time limit (Slurm checks once a minute, so it
# may come up to 60 s earlier). spextract then hands out no more work, finishes or abandons the
# frames in flight without leaving a partial output, writes the report and exits before the
# SIGKILL at the limit: give it longer than one frame takes on one GPU.
# No "B:" prefix: B:TERM@120 would signal only this batch shell, which is waiting for srun and
# would have to forward the signal itself; without it, Slurm signals the tasks of the running
# srun step, i.e. every spextract rank, directly.
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.out
# Site-specific, as needed: --account, --qos, --partition or --constraint (e.g. gpu).

set -euo pipefail

# The modules spextract was built with, in this order: module systems show an MPI build only
# once its compiler is loaded, and the application's module needs both. spextract opens the
# CUDA libraries (driver, NVRTC, cuBLAS, cuSOLVER) when it starts, so the CUDA module only has
# to make them findable. The names differ per centre (`module avail`): fill them in and
# uncomment.
# module load <compiler>
# module load <mpi>
# module load <cuda>
# module load <spextract>

FRAMES=${FRAMES:-frames.txt}      # one `image psf output` triple per line
CONFIG=${CONFIG:-}                # a pipeline.toml; empty for the built-in defaults
OUTDIR=${OUTDIR:-spextract-run}   # the report and per-rank logs; frames go where FRAMES says
SPEXTRACT=${SPEXTRACT:-spextract} # the binary: a path, or a name on PATH (the module's)
REPORT=${REPORT:-$OUTDIR/gpu.json}
LABEL=${LABEL:-GPU nodes}

# The host side of each rank calls BLAS and LAPACK from spextract's own threads; a threaded
# BLAS would start threads of its own inside every one of them, on the same cores. OpenBLAS
# reads its variable when the library is loaded, before spextract runs, hence the environment.
export OMP_NUM_THREADS=1
export MKL_NUM_THREADS=1
export OPENBLAS_NUM_THREADS=1

if [ ! -f "$FRAMES" ]; then
    echo "gpu-node.sh: FRAMES=$FRAMES: no such file (run from the folder it is relative to)" >&2
    exit 2
fi
if ! command -v "$SPEXTRACT" >/dev/null 2>&1; then
    echo "gpu-node.sh: SPEXTRACT=$SPEXTRACT: not found (load its module or give the path)" >&2
    exit 2
fi
mkdir -p "$OUTDIR"
started=$(date +%s)

# GPU binding: with every GPU of the node visible to every rank (--gpu-bind=none), spextract
# gives the node's k-th compute rank the k-th GPU it sees (counting in CUDA_VISIBLE_DEVICES when
# that is set), so the 4 compute ranks cover the 4 GPUs exactly. Under Slurm's per-task binding
# each rank takes device 0 of its own list, and Slurm decides which GPU that is:
# --gpus-per-task=1 would give GPUs to the reader and writer too (6 GPUs for 6 tasks), and
# --gpu-bind=closest or single:N follow CPU placement, which can put two compute ranks on one
# GPU and none on another.
# --cpus-per-task is given to srun again because Slurm 22.05 and later no longer pass sbatch's
# value on to srun; --cpu-bind=cores then pins each rank to cores of its own.
# --unit-bundles 10: a GPU rank extracts a work unit as few batches as its memory allows, and a
# unit of half a frame (10 of its 20 bundles) fills an 80 GB GPU; the CPU default of 2 would
# leave it idle between small batches. Two units per frame keep the reader's cut overlapping.
rc=0
srun --cpu-bind=cores --cpus-per-task="$SLURM_CPUS_PER_TASK" --gpu-bind=none \
    "$SPEXTRACT" extract --frames "$FRAMES" ${CONFIG:+--config "$CONFIG"} \
    --threads "$SLURM_CPUS_PER_TASK" --readers-per-node 1 --writers-per-node 1 --prefetch 2 \
    --unit-bundles 10 --backend gpu --report "$REPORT" --label "$LABEL" --log-dir "$OUTDIR/logs-$SLURM_JOB_ID" ||
    rc=$?

if [ -f "$REPORT" ] && [ "$(stat -c %Y "$REPORT")" -ge "$started" ] &&
    grep -q '"interrupted": true' "$REPORT"; then
    echo "gpu-node.sh: stopped before the time limit; submit the same job again to go on" \
        "(complete frames are skipped)" >&2
fi
exit "$rc"
