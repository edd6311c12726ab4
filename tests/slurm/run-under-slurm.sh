#!/usr/bin/env bash
# Runs the batch scripts in slurm/ the way users do, under a real one-node Slurm on this
# machine, and checks what they leave behind:
#   - cpu-node.sh (sized for this node by sbatch options only) writes frames bit-identical to a
#     single-process extraction, and a report whose frames per node-hour is its frames written
#     over its node-hours; report.sh tabulates that rate;
#   - cpu-node.sh unchanged pends with a reason slurm/README.md explains;
#   - a run stopped by Slurm's --signal ahead of its time limit drains (only complete frames on
#     disk, an interrupted report), and the same job submitted again completes the list;
#   - compare-cpu-gpu.sh on this GPU-less node: unchanged, it refuses before submitting
#     anything; sized for the node, its GPU job fails early with a clear message and the
#     report job still tabulates the CPU run and marks the GPU run as missing.
#
#   tests/slurm/run-under-slurm.sh [path/to/spextract]   (default target/release/spextract)
#
# It needs root on a Debian-like machine: it installs Debian's slurm-wlm, slurmctld, slurmd,
# slurm-client and munge when they are missing, writes a one-node slurm.conf (this node's CPUs
# and memory, from `slurmd -C`) into a temporary folder (SLURM_CONF; /etc/slurm is not touched),
# starts munged (unless one runs), slurmctld and slurmd by hand (PID 1 need not be systemd) and
# stops them on exit. When Slurm cannot be set up it skips with a message, or fails when
# SPEXTRACT_REQUIRE_SLURM is set (CI). KEEP=1 keeps the work folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)

bin=${1:-target/release/spextract}
passed=0

say() { echo "run-under-slurm: $*"; }
unavailable() {
    if [ -n "${SPEXTRACT_REQUIRE_SLURM:-}" ]; then
        echo "run-under-slurm: FAIL: $* (SPEXTRACT_REQUIRE_SLURM is set)" >&2
        exit 1
    fi
    say "skipping: $*"
    exit 0
}
ok() {
    echo "ok  $*"
    passed=$((passed + 1))
}

[ -x "$bin" ] || unavailable "$bin is missing (cargo build --release, or give the binary's path)"
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
[ "$(id -u)" -eq 0 ] || unavailable "not root: installing Slurm and starting its daemons needs root"

# --- Slurm ---------------------------------------------------------------------------------
need=()
for c in slurmctld slurmd sbatch munged; do
    command -v "$c" >/dev/null 2>&1 || need+=("$c")
done
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || unavailable "${need[*]} missing and no apt-get to install them"
    say "installing slurm-wlm slurmctld slurmd slurm-client munge (missing: ${need[*]})"
    # The packages' start scripts fail harmlessly without systemd ("policy-rc.d denied
    # execution of start"); the daemons are started by hand below.
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        slurm-wlm slurmctld slurmd slurm-client munge >/dev/null; } ||
        unavailable "apt-get could not install Slurm"
fi

work=$(mktemp -d /tmp/spextract-slurm.XXXXXX)
export SLURM_CONF=$work/slurm.conf
started_munged=
stop_daemons() {
    local rc=$?
    local pids=()
    for f in "$work/slurmd.pid" "$work/slurmctld.pid" ${started_munged:+/run/munge/munged.pid}; do
        [ -f "$f" ] && pids+=("$(cat "$f")")
    done
    if [ ${#pids[@]} -gt 0 ]; then
        kill "${pids[@]}" 2>/dev/null || true
        # Gone before their folders are removed (slurmctld saves its state as it stops).
        for _ in $(seq 100); do
            local left=0 p
            for p in "${pids[@]}"; do
                # A zombie has stopped; only its parent's wait is missing.
                [ -e "/proc/$p" ] && ! grep -q ') Z ' "/proc/$p/stat" 2>/dev/null && left=1
            done
            [ "$left" -eq 0 ] && break
            sleep 0.1
        done
    fi
    if [ "$rc" -ne 0 ]; then
        for f in "$work"/slurmctld.log "$work"/slurmd.log "$work"/jobs/*.out; do
            [ -f "$f" ] || continue
            echo "--- last lines of $f" >&2
            tail -n 25 "$f" >&2
        done
        echo "run-under-slurm: work folder kept: $work" >&2
    elif [ -z "${KEEP:-}" ]; then
        rm -rf "$work"
    else
        say "work folder kept: $work"
    fi
    exit "$rc"
}
trap stop_daemons EXIT

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || unavailable "no /etc/munge/munge.key (the munge package makes one)"
    mkdir -p /run/munge
    chown munge:munge /run/munge
    su -s /bin/sh munge -c /usr/sbin/munged || unavailable "munged did not start"
    started_munged=1
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || unavailable "munged does not answer"
fi

node=$(slurmd -C 2>/dev/null | head -n 1)
[[ $node == NodeName=* ]] || unavailable "slurmd -C does not describe this node: $node"
mkdir -p "$work/state" "$work/spool" "$work/jobs"
# No cgroups (PID 1 is not systemd): processes tracked by their parents, no task plugin
# binding. pmix: with --mpi=none Debian's Open MPI stops in MPI_Init_thread ("OMPI was not
# built with SLURM's PMI support"). Ports off Slurm's defaults, so that a Slurm already running
# here is left alone.
cat >"$SLURM_CONF" <<EOF
ClusterName=spextract-ci
SlurmctldHost=$(hostname -s)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
MpiDefault=pmix
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MinJobAge=3600
$node State=UNKNOWN
PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld || unavailable "slurmctld did not start (see $work/slurmctld.log)"
slurmd || unavailable "slurmd did not start (see $work/slurmd.log)"
for _ in $(seq 60); do
    [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && break
    sleep 0.5
done
[ "$(sinfo -h -o %T)" = idle ] || unavailable "the node did not come up: $(sinfo -h -o '%T %E')"
cores=$(sed -nE 's/.*CPUs=([0-9]+).*/\1/p' <<<"$node")
say "Slurm $(sinfo -V | awk '{ print $2 }') up in $work: $node"

# --- checks --------------------------------------------------------------------------------
fail() {
    echo "run-under-slurm: FAIL: $*" >&2
    exit 1
}
# The first value of "key": in a report.
json_value() {
    sed -nE "s/^[[:space:]]*\"$2\": \"?([^\",]*)\"?,?$/\\1/p" "$1" | head -n 1
}
# Two frames hold the same bytes except for the CHECKSUM cards and the comments of the DATASUM
# cards, which carry the time the file was written: every differing byte must lie in such a
# card, and the DATASUM values themselves must agree.
same_frame() {
    [ -f "$2" ] || fail "$2: missing"
    [ "$(stat -c %s "$1")" = "$(stat -c %s "$2")" ] ||
        fail "$2: $(stat -c %s "$2") bytes, $1 has $(stat -c %s "$1")"
    local card a b
    while read -r card; do
        a=$(dd if="$1" bs=80 skip="$card" count=1 2>/dev/null | tr -d '\0')
        b=$(dd if="$2" bs=80 skip="$card" count=1 2>/dev/null | tr -d '\0')
        case "$a" in
        "CHECKSUM= "*) [[ $b == "CHECKSUM= "* ]] && continue ;;
        "DATASUM = "*) [ "${a%%/*}" = "${b%%/*}" ] && continue ;;
        esac
        fail "$2 differs from $1 in 80-byte record $card: '$a' vs '$b'"
    done < <(cmp -l "$1" "$2" | awk '{ print int(($1 - 1) / 80) }' | uniq)
}
# The job ids' states, until none is pending or running (at most $1 seconds).
wait_jobs() {
    local limit=$1
    shift
    local t=0
    while [ -n "$(squeue -h -j "$(
        IFS=,
        echo "$*"
    )" -t PD,R,CG,CF -o %i 2>/dev/null)" ]; do
        [ "$t" -lt "$limit" ] || fail "jobs $* still queued after $limit s: $(squeue -h -o '%i %T %r')"
        sleep 1
        t=$((t + 1))
    done
}
job_field() { scontrol show job "$1" | grep -oE "(^|[[:space:]])$2=[^[:space:]]*" | head -n 1 | cut -d= -f2; }

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 # the jobs run as root here
export OPENBLAS_NUM_THREADS=1 SPEXTRACT="$bin"
# This node's size: one reader+writer rank and one compute rank of one core each; the scripts'
# own sizes are for 128-core nodes. Only sbatch options adapt them.
small=(--nodes=1 --ntasks-per-node=2 --cpus-per-task=1)
in=$work/in
mkdir -p "$in"
cd "$in"
# 50 fibers (2 bundles) over 1000 Å: a couple of seconds per frame on one core. Every frame of
# the lists is this one exposure under another output name, so one reference serves them all.
"$bin" simulate --make-psf psf.fits --nfiber 50 2>/dev/null
"$bin" simulate -p psf.fits -i preproc.fits -t truth.fits -n 50 -w 6000,7000,0.8 2>/dev/null
printf '[extract]\nwavelength = [6000.0, 7000.0, 0.8]\n' >run.toml
# The lists name the same files, resolved to these paths, which the frames record (IN_PSF, IN_IMG).
"$bin" extract -p "$in/psf.fits" -i "$in/preproc.fits" -o single.fits --config run.toml --threads 1 2>/dev/null
frames_list() { # $1: list file, $2: output folder, $3: frames
    for i in $(seq "$3"); do echo "preproc.fits psf.fits $2/frame-$i.fits"; done >"$1"
}
cd "$work/jobs"

# 1. cpu-node.sh, sized for this node, and report.sh on its report.
frames_list "$in/frames.txt" cpu 3
FRAMES=$in/frames.txt CONFIG=$in/run.toml OUTDIR=$work/run-cpu timeout 600 \
    sbatch --wait --parsable "${small[@]}" "$repo/slurm/cpu-node.sh" >cpu.id ||
    fail "cpu-node.sh job $(cat cpu.id) failed"
for i in 1 2 3; do same_frame "$in/single.fits" "$in/cpu/frame-$i.fits"; done
ok "cpu-node.sh (${small[*]}): 3 frames bit-identical to a single-process extraction"
rep=$work/run-cpu/cpu.json
[ -f "$rep" ] || fail "cpu-node.sh wrote no report $rep"
written=$(json_value "$rep" written)
wall=$(json_value "$rep" wall_s)
nodes=$(json_value "$rep" nodes)
rate=$(json_value "$rep" frames_per_node_hour)
[ "$written" = 3 ] && [ "$nodes" = 1 ] && [ "$(json_value "$rep" ranks)" = 2 ] ||
    fail "$rep: written $written, nodes $nodes, ranks $(json_value "$rep" ranks); expected 3, 1, 2"
awk -v r="$rate" -v n="$written" -v w="$wall" -v k="$nodes" \
    'BEGIN { e = n / (w * k / 3600); exit !(r > 0 && (r - e) ^ 2 <= (1e-9 * e) ^ 2) }' ||
    fail "$rep: frames_per_node_hour $rate is not $written / ($wall s x $nodes node / 3600 s)"
ok "cpu-node.sh report: $written frames in $wall s on $nodes node = $rate frames per node-hour"
OUTDIR=$work/run-cpu timeout 300 sbatch --wait --parsable "$repo/slurm/report.sh" "$rep" >report.id ||
    fail "report.sh job $(cat report.id) failed"
row=$(grep -E '^\| 1 \|' "$work/run-cpu/compare.txt") || fail "no row 1 in $work/run-cpu/compare.txt"
shown=$(awk -F'|' '{ gsub(/ /, "", $13); print $13 }' <<<"$row")
awk -v a="$shown" -v b="$rate" 'BEGIN { exit !((a - b) ^ 2 <= 0.0025) }' ||
    fail "report.sh shows $shown frames per node-hour, the report says $rate: $row"
[ -s "$work/run-cpu/compare.svg" ] || fail "report.sh drew no chart"
ok "report.sh: compare.txt shows $shown frames per node-hour, and compare.svg"

# 2. cpu-node.sh unchanged asks for 2 nodes of 16 x 8 cores: Slurm accepts it and it pends.
job=$(sbatch --parsable "$repo/slurm/cpu-node.sh")
for _ in $(seq 20); do
    reason=$(squeue -h -j "$job" -o '%T %r')
    [ "$reason" = "PENDING None" ] || break # not yet looked at by the scheduler
    sleep 0.5
done
scancel "$job"
[[ $reason == PENDING\ * ]] || fail "cpu-node.sh unchanged on a $cores-CPU node: '$reason', expected PENDING"
grep -q -- "${reason#PENDING }" "$repo/slurm/README.md" ||
    fail "cpu-node.sh unchanged pends with Reason=${reason#PENDING }, which slurm/README.md does not explain"
ok "cpu-node.sh unchanged on this node: $reason, explained in slurm/README.md"

# 3. The time limit. Slurm checks every 30 s and signals a job whose end is within --signal's
# lead time plus 30 s, so with --time=1 and TERM@45 the SIGTERM comes at its first check, at
# most 30 s after the start, to a run of 40 frames that takes longer than that (and longer than
# the limit). The run drains, and the same job again completes the list.
n=40
frames_list "$in/limit.txt" limit $n
FRAMES=$in/limit.txt CONFIG=$in/run.toml OUTDIR=$work/run-limit REPORT=$work/run-limit/first.json \
    timeout 300 sbatch --wait --parsable "${small[@]}" --time=1 --signal=TERM@45 \
    "$repo/slurm/cpu-node.sh" >limit.id && fail "the time-limited job $(cat limit.id) exited 0"
job=$(cat limit.id)
rep=$work/run-limit/first.json
[ -f "$rep" ] || fail "the time-limited job $job wrote no report: it was killed, not drained"
[ "$(json_value "$rep" interrupted)" = true ] || fail "$rep: not interrupted"
first=$(json_value "$rep" written)
[ "$first" -lt $n ] || fail "$rep: all $n frames written before the signal"
grep -q 'stopped before the time limit; submit the same job again' "spextract-cpu-$job.out" ||
    fail "spextract-cpu-$job.out does not say the run stopped before the time limit"
state=$(job_field "$job" JobState)
[ "$state" = FAILED ] || fail "job $job: $state; a drained run exits 1, which Slurm calls FAILED"
# Slurm's line for the signal reads like a kill; slurm/README.md tells operators it is not.
grep -q "\*\*\* STEP $job\.0 ON .* CANCELLED AT" "spextract-cpu-$job.out" ||
    fail "no '*** STEP $job.0 ... CANCELLED AT' line in spextract-cpu-$job.out: update slurm/README.md"
grep -q 'CANCELLED AT' "$repo/slurm/README.md" || fail "slurm/README.md does not explain Slurm's STEP CANCELLED line"
stray=$(find "$in/limit" -mindepth 1 ! -name 'frame-*.fits' 2>/dev/null || true)
[ -z "$stray" ] || fail "the drained run left other files than complete frames: $stray"
ok "--time=1 --signal=TERM@45: drained after $first of $n frames (job $state, report interrupted, no partial output)"
FRAMES=$in/limit.txt CONFIG=$in/run.toml OUTDIR=$work/run-limit REPORT=$work/run-limit/second.json \
    timeout 300 sbatch --wait --parsable "${small[@]}" --time=10 "$repo/slurm/cpu-node.sh" >resume.id ||
    fail "the resumed job $(cat resume.id) failed"
rep=$work/run-limit/second.json
[ "$(json_value "$rep" skipped)" = "$first" ] && [ "$(json_value "$rep" written)" = $((n - first)) ] ||
    fail "$rep: skipped $(json_value "$rep" skipped), written $(json_value "$rep" written); expected $first and $((n - first))"
for i in $(seq $n); do same_frame "$in/single.fits" "$in/limit/frame-$i.fits"; done
ok "the same job again: skipped $first, wrote $((n - first)); all $n frames bit-identical"

# 4. compare-cpu-gpu.sh with the GPU job unchanged: this node has no GPU, so Slurm refuses
# it. The script must say so before submitting anything, and leave OUTDIR usable.
frames_list "$in/compare.txt" out 2
rc=0
CPU_SBATCH="${small[*]} --time=5" FRAMES=$in/compare.txt CONFIG=$in/run.toml OUTDIR=$work/compare \
    "$repo/slurm/compare-cpu-gpu.sh" >compare1.log 2>&1 || rc=$?
[ "$rc" -ne 0 ] || fail "compare-cpu-gpu.sh exited 0 with a GPU job Slurm refuses: $(cat compare1.log)"
grep -q 'GPU job' compare1.log || fail "compare-cpu-gpu.sh does not name the GPU job: $(cat compare1.log)"
[ -z "$(squeue -h -o %i)" ] || fail "compare-cpu-gpu.sh left jobs queued: $(squeue -h)"
[ -z "$(ls -A "$work/compare" 2>/dev/null)" ] || fail "compare-cpu-gpu.sh left files in OUTDIR"
ok "compare-cpu-gpu.sh with a GPU job Slurm refuses: exit $rc, nothing submitted: $(cat compare1.log)"

# 5. compare-cpu-gpu.sh sized for this node: the GPU job is accepted, dies at start-up (no
# GPU), and the comparison still shows the CPU run and marks the GPU run.
CPU_SBATCH="${small[*]} --time=5" GPU_SBATCH="${small[*]} --time=5 --gpus-per-node=0" \
    FRAMES=$in/compare.txt CONFIG=$in/run.toml OUTDIR=$work/compare \
    "$repo/slurm/compare-cpu-gpu.sh" >compare2.log 2>&1 || fail "compare-cpu-gpu.sh: $(cat compare2.log)"
read -r cpu gpu report < <(sed -nE 's/.*CPU job ([0-9]+), GPU job ([0-9]+), report job ([0-9]+).*/\1 \2 \3/p' compare2.log)
[ -n "$report" ] || fail "compare-cpu-gpu.sh printed no job ids: $(cat compare2.log)"
wait_jobs 600 "$cpu" "$gpu" "$report"
[ "$(job_field "$cpu" JobState)" = COMPLETED ] || fail "CPU job $cpu: $(job_field "$cpu" JobState)"
[ "$(job_field "$gpu" JobState)" = FAILED ] || fail "GPU job $gpu: $(job_field "$gpu" JobState), expected FAILED"
runtime=$(job_field "$gpu" RunTime)
[[ $runtime < 00:01:00 ]] || fail "GPU job $gpu ran $runtime before failing"
grep -q 'ERROR.*--backend gpu' "spextract-gpu-$gpu.out" ||
    fail "GPU job $gpu does not say why it failed: $(cat "spextract-gpu-$gpu.out")"
for i in 1 2; do same_frame "$in/single.fits" "$work/compare/cpu/frame-$i.fits"; done
ok "GPU job on a GPU-less node: FAILED after $runtime: $(grep -m1 -o 'ERROR.*--backend gpu.*' "spextract-gpu-$gpu.out")"
table=$work/compare/compare.txt
grep -qE '^\| 1 \| CPU nodes +\| cpu ' "$table" || fail "$table has no CPU row: $(cat "$table")"
grep -qE '^\| 2 \| .*no report' "$table" || fail "$table does not mark the GPU run: $(cat "$table")"
[ "$(job_field "$report" JobState)" = FAILED ] ||
    fail "report job $report: $(job_field "$report" JobState); with a report missing it should fail"
# The chart's texts are lines of their own: row 2's label, and "no report" where its bar would be.
{ grep -qx '2\. gpu' "$work/compare/compare.svg" && grep -qx 'no report' "$work/compare/compare.svg"; } ||
    fail "compare.svg does not mark the GPU run"
ok "report job $report: the CPU row, and the GPU run marked: $(grep -E '^\| 2 \|' "$table" | tr -s ' ')"

cd "$repo"
say "$passed passed, 0 failed"
