#!/usr/bin/env bash
# Compares run reports once their jobs are done: the table of frames per node-hour (in this
# job's output and OUTDIR/compare.txt) and a bar chart. compare-cpu-gpu.sh submits it after the
# CPU and GPU jobs; alone:
#
#   sbatch --dependency=afterany:JOBID1:JOBID2 slurm/report.sh run-cpu/cpu.json run-gpu/gpu.json
#
# The reports are its arguments (default OUTDIR/cpu.json OUTDIR/gpu.json); the first is the
# baseline. A report that does not exist (its job died at start-up, or never ran) is a row
# marked "no report": the others are still compared, and the job exits 1. spextract report
# needs no MPI launch, so it also runs as a plain command on a login node.
#SBATCH --job-name=spextract-report
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:05:00
#SBATCH --output=%x-%j.out
# Site-specific, as needed: --account, --qos, --partition.

set -euo pipefail

# The binary is linked against MPI, so its libraries must be found even here: the same modules,
# in the same order, as the extraction jobs.
# module load <compiler>
# module load <mpi>
# module load <spextract>

OUTDIR=${OUTDIR:-spextract-run}
SPEXTRACT=${SPEXTRACT:-spextract}
CHART=${CHART:-$OUTDIR/compare.svg} # SVG only
if [ $# -eq 0 ]; then
    set -- "$OUTDIR/cpu.json" "$OUTDIR/gpu.json"
fi
mkdir -p "$OUTDIR"
"$SPEXTRACT" report "$@" --chart "$CHART" | tee "$OUTDIR/compare.txt"
