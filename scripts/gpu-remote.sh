#!/usr/bin/env bash
# The GPU checks, run ON the GPU machine (no Rust there) from the repository root, with the
# folder .gpu/ that scripts/gpu-session.sh staged here and the device tool carried there:
#   run(command="bash scripts/gpu-remote.sh", carry=[".gpu"])
# Steps, in order of importance; each runs even if the one before failed, under `timeout`,
# and the whole script keeps within GPU_REMOTE_BUDGET_S seconds (default 480):
#   env.log        nvidia-smi (and its free memory per UUID, to set beside doctor's NVML
#                  figures), the libraries the binaries resolve, `spextract doctor`
#   gpu-tests.log  the library's GPU unit tests (extract::gpu), one thread, --nocapture
#   parity.log     bundle 0 of the shared preproc extracted on the CPU and on the GPU;
#                  GPU vs CPU, GPU vs gpu_specter's frame and vs the truth (`spextract compare`);
#                  then GPU vs CPU on what no GPU has run: CCD-edge patches with
#                  --ivar-from-model (a frame, and a list of 2), and a PSF with a tail
#   ivar.log       issue 14's cost of --ivar-from-model on the GPU: a full r frame with IVAR
#                  from its pixels, one pass against two (scripts/bench-ivar-model.sh, 2
#                  rounds), then a list of 2 such frames through the pipeline
#   bench.log      a full 500-fiber r frame simulated through the real PSF, then
#                  `spextract bench --backend cpu,gpu` on it (as BENCHMARKS.md)
#   full.log       that frame extracted on the GPU and on the CPU, compared (and vs the truth)
#   sidebyside.log another extractor on the same full frame, when .gpu/sidebyside/run.sh is
#                  staged (e.g. gpu_specter: it stays outside the repository), compared
#   sanitizer.log  bundle 0 on the GPU under compute-sanitizer memcheck, where it is installed
#   mpi.log        when the cuda-aware-mpi binary and a CUDA-aware Open MPI are staged
#                  (GPU_CUDA_MPI at staging): that MPI's CUDA support, `doctor` under it, then
#                  a list of full frames under `mpirun -np 3` and `-np 4` with the host-staged
#                  and the cuda-aware build, whose frames are compared bit for bit, with the
#                  runs' JSON reports (GPU_MPI_FRAMES frames, default 6;
#                  GPU_MPI_BACKEND and GPU_MPI_ARGS rehearse it elsewhere, e.g. cpu and -n 25)
#   summary.txt    each step's exit code and seconds, and the tests' "skipping" lines
# GPU_REMOTE_STEPS picks groups of steps (env tests parity ivar bench full side sanitizer mpi;
# default all); the full frame is simulated whenever bench, full, side or mpi runs.
# Logs go to $OUT (the tool's; elsewhere default /tmp/spextract-gpu-out). Without a GPU the
# GPU steps fail or skip with the reason; the exit code is 1 when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
root=$PWD
stage=$root/.gpu
out=${OUT:-/tmp/spextract-gpu-out}
scratch=${GPU_SCRATCH:-/tmp/spextract-gpu}
budget=${GPU_REMOTE_BUDGET_S:-480}
grid=5760,7620,0.8
# The groups of steps to run (default all).
steps=" ${GPU_REMOTE_STEPS:-env tests parity ivar bench full side sanitizer mpi} "
want() { [[ "$steps" == *" $1 "* ]]; }
mkdir -p "$out"
summary=$out/summary.txt
: >"$summary"
failed=0

chmod +x "$stage"/bin/* 2>/dev/null # in case the copy lost the mode
if [ ! -x "$stage/bin/spextract" ] || [ ! -f "$stage/lib.tar.gz" ]; then
    echo "gpu-remote: $stage is not staged: run scripts/gpu-session.sh here and carry \".gpu\"" |
        tee -a "$summary" >&2
    exit 2
fi

# Seconds a step may take: its own limit, cut to what is left of the budget (minus a reserve
# for the summary). Prints 0 when nothing is left.
allowance() {
    local left=$((budget - SECONDS - 15))
    if [ "$left" -lt 5 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

# step LOG LIMIT_S LABEL CMD...: runs CMD under timeout, stdout and stderr appended to
# $out/LOG, records the exit code in the summary.
step() {
    local log=$out/$1 limit label=$3 t0 rc
    limit=$(allowance "$2")
    shift 3
    if [ "$limit" = 0 ]; then
        echo "SKIP  $label (budget of ${budget}s spent)" | tee -a "$summary" "$log"
        failed=1
        return 1
    fi
    local shown=("$@")
    [ "$1" = env ] && shown=("${@:3}") # the LD_LIBRARY_PATH is in env.log
    printf '\n== %s (limit %ss)\n$ %s\n' "$label" "$limit" "${shown[*]}" | tee -a "$log"
    t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    local what=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then what="TIMEOUT"; elif [ "$rc" != 0 ]; then what="FAIL"; fi
    [ "$rc" = 0 ] || failed=1
    printf '%-7s rc=%-3s %4ss  %s\n' "$what" "$rc" "$((SECONDS - t0))" "$label" | tee -a "$summary"
    return "$rc"
}

# The CUDA libraries: the pip wheels' folders (nvidia/<pkg>/lib, or nvidia/cu13/lib for the
# CUDA 13 wheels), asked of python3 before LD_LIBRARY_PATH points at the staged libraries,
# then the toolkit's and the driver's folder (libcuda, also found through the loader's cache).
cuda_dirs=$(python3 - 2>/dev/null <<'PY'
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
dirs = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "*", "lib"))):
        # cu13 (CUDA 13 layout) first, then the per-package folders
        if os.path.isdir(d) and d not in dirs:
            dirs.append(d)
dirs.sort(key=lambda d: 0 if os.path.basename(os.path.dirname(d)).startswith("cu") else 1)
print(":".join(dirs))
PY
)
if [ -z "$cuda_dirs" ]; then
    cuda_dirs=$(find /opt /usr/local/lib /usr/lib/python3* /root/.local -maxdepth 7 -type d \
        -path '*-packages/nvidia/*/lib' 2>/dev/null | sort | paste -sd: -)
fi
# The toolkit's folder only when no wheel was found: cudarc tries the unversioned names
# (libcublas.so) first, and a toolkit of another CUDA version there would load under the
# CUDA 13 bindings. The driver's folder always (libcuda).
toolkit_dirs=/usr/local/nvidia/lib64
[ -n "$cuda_dirs" ] || toolkit_dirs="/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $toolkit_dirs"
for d in $toolkit_dirs; do
    [ -d "$d" ] && cuda_dirs=${cuda_dirs:+$cuda_dirs:}$d
done

rm -rf "$scratch"
mkdir -p "$scratch/ptx"
tar -C "$scratch" -xzf "$stage/lib.tar.gz"
libpath=$scratch/lib${cuda_dirs:+:$cuda_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
sx=(env "LD_LIBRARY_PATH=$libpath" "$stage/bin/spextract")
tests=(env "LD_LIBRARY_PATH=$libpath" "$stage/bin/spextract-lib-tests")

# One process, no MPI launcher: spextract calls MPI_Init only under one.
unset OMPI_COMM_WORLD_SIZE OMPI_COMM_WORLD_RANK OMPI_COMM_WORLD_LOCAL_RANK \
    OMPI_COMM_WORLD_LOCAL_SIZE PMIX_RANK PMIX_SIZE PMI_RANK PMI_SIZE SLURM_STEP_ID
ncpu=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) # GNU nproc obeys these
export OPENBLAS_NUM_THREADS=1 RUST_BACKTRACE=1 NO_COLOR=1
export SPEXTRACT_TEST_DATA=$stage/data SPEXTRACT_PTX_CACHE=$scratch/ptx SPEXTRACT_REQUIRE_NVRTC=1
data=$stage/data
psf=$data/psf-r0-00067784.fits

# --- environment ---
{
    echo "== $(date -u +%FT%TZ) $(hostname), $ncpu cores, $(uname -r)"
    cat "$stage/MANIFEST"
    echo "== glibc here: $(ldd --version 2>&1 | head -1)"
    echo "== LD_LIBRARY_PATH of spextract: $libpath"
    echo "== CUDA library folders: ${cuda_dirs:-none found}"
    for d in ${cuda_dirs//:/ }; do
        for f in "$d"/lib{cublas,cublasLt,cusolver,cusparse,nvJitLink,nvrtc,cudart}.so*; do
            [ -e "$f" ] && echo "  $f"
        done
    done
    echo "== libcuda: $(ldconfig -p 2>/dev/null | grep -m1 'libcuda\.so\.1' || echo 'not in the loader cache')"
    echo "== libnvidia-ml: $(ldconfig -p 2>/dev/null | grep -m1 'libnvidia-ml\.so\.1' || echo 'not in the loader cache')"
} 2>&1 | tee -a "$out/env.log"
want env && step env.log 30 "nvidia-smi" nvidia-smi
want env && step env.log 20 "nvidia-smi memory per GPU (doctor's NVML line should agree)" \
    nvidia-smi --query-gpu=index,uuid,pci.bus_id,memory.total,memory.free --format=csv
# shellcheck disable=SC2016 # expanded by the inner bash
want env && step env.log 20 "staged libraries resolve (ldd)" bash -c '
    rc=0
    for b in "$1/bin/spextract" "$1/bin/spextract-lib-tests"; do
        r=$(LD_LIBRARY_PATH=$2 ldd "$b")
        echo "$(basename "$b"): $(grep -c "=> $3/lib/" <<<"$r") staged libraries; from the system:"
        grep "=>" <<<"$r" | grep -v "=> $3/lib/" | sed "s/^/  /"
        grep -q "not found" <<<"$r" && rc=1
    done
    for l in libcublas.so.13 libcusolver.so.12 libnvrtc.so.13; do
        f=$(IFS=:; for d in $2; do [ -e "$d/$l" ] && { echo "$d/$l"; break; }; done)
        if [ -z "$f" ]; then echo "$l: not on LD_LIBRARY_PATH"; continue; fi
        echo "$l: $f"
        LD_LIBRARY_PATH=$2 ldd "$f" | grep "not found" && rc=1
    done
    exit $rc' _ "$stage" "$libpath" "$scratch"
want env && step env.log 60 "spextract doctor" "${sx[@]}" doctor

# --- the GPU unit tests (the kernels' CPU emulation, `emu`, needs no GPU: CI runs it) ---
want tests && step gpu-tests.log 240 "GPU unit tests (extract::gpu)" \
    "${tests[@]}" extract::gpu --skip extract::gpu::twins::emu --nocapture --test-threads=1

# --- parity on the shared data: bundle 0 ---
b00=(-p "$psf" -i "$data/preproc-r0-b00.fits.gz" -w "$grid" -s 0 -n 25 --no-progress --overwrite)
want parity && step parity.log 90 "extract bundle 0, GPU" "${sx[@]}" extract "${b00[@]}" --backend gpu \
    -o "$scratch/frame-b00-gpu.fits"
want parity && step parity.log 90 "extract bundle 0, CPU" "${sx[@]}" extract "${b00[@]}" --backend cpu \
    -o "$scratch/frame-b00-cpu.fits"
want parity && step parity.log 30 "compare bundle 0: GPU vs CPU" \
    "${sx[@]}" compare "$scratch/frame-b00-gpu.fits" "$scratch/frame-b00-cpu.fits"
want parity && step parity.log 30 "compare bundle 0: GPU vs gpu_specter, and vs the truth" \
    "${sx[@]}" compare "$scratch/frame-b00-gpu.fits" "$data/frame-r0-b00-gpu_specter.fits.gz" \
    --truth "$data/truth-r0-b00.fits.gz"

# --- what no GPU has run yet, GPU against CPU: CCD-edge patches (the grid past both ends of the
#     chip; they take the CPU fallback), --ivar-from-model (its first pass, the model image and
#     the leverage, on the device) for one frame and for a list through the pipeline, and the
#     tail term in the spot kernel ---
if want parity; then
    new=(-p "$psf" -w 5554,7776,0.8 -n 50 --no-progress --overwrite)
    step parity.log 60 "simulate 50 fibers past both CCD ends, IVAR from the pixels" \
        "${sx[@]}" simulate -p "$psf" -i "$scratch/edge.fits" -t "$scratch/edge-truth.fits" -n 50 \
        -w 5554,7776,0.8 --ivar-from-data --overwrite
    for b in gpu cpu; do
        step parity.log 90 "edge frame with --ivar-from-model, $b" "${sx[@]}" extract "${new[@]}" \
            -i "$scratch/edge.fits" -o "$scratch/edge-$b.fits" --ivar-from-model --backend "$b"
    done
    # The cost of the option on the GPU (issue 14): the same frame in one pass, for the ratio
    # of the two extractions' "wrote ... in N s total" lines.
    step parity.log 90 "edge frame in one pass, gpu" "${sx[@]}" extract "${new[@]}" \
        -i "$scratch/edge.fits" -o "$scratch/edge-gpu-once.fits" --backend gpu
    step parity.log 30 "compare the edge frame: GPU vs CPU, and vs the truth" "${sx[@]}" compare \
        "$scratch/edge-gpu.fits" "$scratch/edge-cpu.fits" --truth "$scratch/edge-truth.fits" \
        --mean-pull-tol 0.05 # issue 14's target for --ivar-from-model
    printf '%s\n' "$scratch/edge.fits $psf $scratch/list/edge-1.fits" \
        "$scratch/edge.fits $psf $scratch/list/edge-2.fits" >"$scratch/edge-list.txt"
    printf '[extract]\nwavelength = [5554, 7776, 0.8]\nnspec = 50\n' >"$scratch/edge.toml"
    step parity.log 90 "a list of 2 with --ivar-from-model, GPU (one process)" "${sx[@]}" extract \
        --frames "$scratch/edge-list.txt" --config "$scratch/edge.toml" --ivar-from-model \
        --backend gpu --no-progress --overwrite
    step parity.log 30 "compare the list's frame with the single GPU frame" "${sx[@]}" compare \
        "$scratch/list/edge-1.fits" "$scratch/edge-gpu.fits"
    step parity.log 30 "synthetic PSF with a tail" "${sx[@]}" simulate \
        --make-psf "$scratch/psf-tail.fits" --nfiber 50 --tail 0.002,1.5,1,1.3,1.2 --overwrite
    step parity.log 60 "simulate 50 fibers through the tail PSF" "${sx[@]}" simulate \
        -p "$scratch/psf-tail.fits" -i "$scratch/tail.fits" -t "$scratch/tail-truth.fits" -n 50 \
        --overwrite
    for b in gpu cpu; do
        step parity.log 90 "tail frame, $b" "${sx[@]}" extract -p "$scratch/psf-tail.fits" \
            -i "$scratch/tail.fits" -o "$scratch/tail-$b.fits" -n 50 --backend "$b" \
            --no-progress --overwrite
    done
    step parity.log 30 "compare the tail frame: GPU vs CPU, and vs the truth" "${sx[@]}" compare \
        "$scratch/tail-gpu.fits" "$scratch/tail-cpu.fits" --truth "$scratch/tail-truth.fits"
fi

# --- issue 14: what --ivar-from-model costs on the GPU, a full frame and a list of 2 ---
if want ivar; then
    # The benchmark calls the binary by name: a wrapper gives it the staged libraries.
    printf '#!/bin/sh\nexec env LD_LIBRARY_PATH="%s" "%s" "$@"\n' "$libpath" "$stage/bin/spextract" \
        >"$scratch/spextract-wrapped"
    chmod +x "$scratch/spextract-wrapped"
    step ivar.log 240 "--ivar-from-model against one pass, 500 fibers, GPU" env \
        SPEXTRACT_BIN="$scratch/spextract-wrapped" BACKEND=gpu PSF="$psf" NSPEC=500 \
        THREADS="$ncpu" REPEATS=2 LIST_FRAMES=2 BENCH_DIR="$scratch/ivar" \
        bash scripts/bench-ivar-model.sh
fi

# --- benchmark: a full r frame, as BENCHMARKS.md ---
{ want bench || want full || want side || want mpi; } && step bench.log 120 "simulate a full 500-fiber r frame" "${sx[@]}" simulate -p "$psf" \
    -i "$scratch/full.fits" -t "$scratch/full-truth.fits" -n 500 -w "$grid" --overwrite
want bench && step bench.log 200 "bench --backend cpu,gpu (threads $ncpu,1)" "${sx[@]}" bench -p "$psf" \
    -i "$scratch/full.fits" -w "$grid" --thread-counts "$ncpu,1" --oracle-patches 3 \
    --backend cpu,gpu --no-progress

# --- the full frame on both backends, compared ---
full=(-p "$psf" -i "$scratch/full.fits" -w "$grid" --no-progress --overwrite)
want full && step full.log 120 "extract the full frame, GPU" "${sx[@]}" extract "${full[@]}" --backend gpu \
    -o "$scratch/full-gpu.fits"
want full && step full.log 120 "extract the full frame, CPU ($ncpu threads)" "${sx[@]}" extract "${full[@]}" \
    --backend cpu -o "$scratch/full-cpu.fits"
want full && step full.log 60 "compare the full frame: GPU vs CPU, and vs the truth" "${sx[@]}" compare \
    "$scratch/full-gpu.fits" "$scratch/full-cpu.fits" --truth "$scratch/full-truth.fits"

# --- a side-by-side run, when one is staged (.gpu/sidebyside/run.sh: another extractor, not
# part of this repository, run on the same full frame; it writes frame-other.fits) ---
side=$stage/sidebyside/run.sh
if want side && [ -f "$side" ]; then
    step sidebyside.log 200 "side-by-side extractor on the full frame" \
        bash "$side" "$psf" "$scratch/full.fits" "$scratch"
    step sidebyside.log 60 "compare the full frame: GPU vs the side-by-side extractor" \
        "${sx[@]}" compare "$scratch/full-gpu.fits" "$scratch/frame-other.fits" \
        --truth "$scratch/full-truth.fits"
fi

# --- bundle 0 on the GPU under compute-sanitizer's memcheck (out-of-bounds and misaligned
# accesses, in our kernels and the libraries' calls), when the machine has it ---
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if want sanitizer && [ -n "$sanitizer" ]; then
    step sanitizer.log 120 "bundle 0 on the GPU under compute-sanitizer memcheck" \
        env "LD_LIBRARY_PATH=$libpath" "$sanitizer" --tool memcheck --error-exitcode 3 \
        --print-limit 20 "$stage/bin/spextract" extract "${b00[@]}" --backend gpu \
        -o "$scratch/frame-b00-memcheck.fits"
fi
# ... and the unit kept on the device (unit.cu, adopted pixels), the cuda-aware path's kernel.
if { want sanitizer || want mpi; } && [ -n "$sanitizer" ]; then
    step sanitizer.log 90 "the unit-on-device GPU test under compute-sanitizer memcheck" \
        env "LD_LIBRARY_PATH=$libpath" "$sanitizer" --tool memcheck --error-exitcode 3 \
        --print-limit 20 "$stage/bin/spextract-lib-tests" a_unit_kept_on_the_device \
        --nocapture --test-threads=1
fi

# --- CUDA-aware MPI (issue 11): the same list of frames through the host-staged and the
# cuda-aware-mpi build, both under the staged CUDA-aware Open MPI ---
ca_bin=$stage/bin/spextract-cuda-aware
if want mpi && [ -x "$ca_bin" ] && [ -f "$stage/ompi.tar.gz" ]; then
    ompi=$scratch/ompi
    mkdir -p "$ompi"
    tar -C "$ompi" -xzf "$stage/ompi.tar.gz"
    export OPAL_PREFIX=$ompi OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
        OMPI_MCA_rmaps_base_oversubscribe=1
    mpilib=$ompi/lib:$libpath
    mpirun=(env "LD_LIBRARY_PATH=$mpilib" "PATH=$ompi/bin:$PATH" "$ompi/bin/mpirun" --bind-to none
        -x LD_LIBRARY_PATH -x OPAL_PREFIX -x OPENBLAS_NUM_THREADS -x SPEXTRACT_PTX_CACHE -x NO_COLOR)
    { echo "== Open MPI parameters from the environment:"; env | grep '^OMPI_MCA_' | sort; } >>"$out/mpi.log"
    step mpi.log 20 "ompi_info: the staged Open MPI's CUDA support" \
        bash -c 'LD_LIBRARY_PATH=$1 "$2/bin/ompi_info" --parsable --all | grep -E "mpi_built_with_cuda_support:value|ompi:version:full"' \
        _ "$mpilib" "$ompi"
    step mpi.log 60 "doctor of the cuda-aware build under mpirun -np 1" "${mpirun[@]}" -np 1 "$ca_bin" doctor
    nframes=${GPU_MPI_FRAMES:-6}
    for np in 3 4; do
        for build in host device; do
            bin=$stage/bin/spextract
            [ "$build" = device ] && bin=$ca_bin
            dir=$scratch/mpi-$build-np$np
            mkdir -p "$dir"
            for i in $(seq 1 "$nframes"); do
                echo "$scratch/full.fits $psf $dir/frame-$i.fits"
            done >"$dir/list.txt"
            step mpi.log 150 "$nframes full frames, $build build, mpirun -np $np" "${mpirun[@]}" -np "$np" \
                "$bin" extract --frames "$dir/list.txt" -w "$grid" --backend "${GPU_MPI_BACKEND:-gpu}" \
                --ranks-per-gpu $((np - 2)) --no-progress --report "$dir/report.json" ${GPU_MPI_ARGS:-}
            { echo "== report of the $build build, -np $np:"; cat "$dir/report.json" 2>/dev/null; echo; } >>"$out/mpi.log"
        done
        # Byte for byte, except the CHECKSUM cards (cfitsio stamps them with the time of
        # writing, and the checksum covers the header): the DATASUMs must agree too.
        step mpi.log 60 "-np $np: cuda-aware frames vs host-staged frames, bit for bit" python3 -c '
import glob, os, sys
def cards(path):
    b = bytearray(open(path, "rb").read())
    for i in range(0, len(b), 80):
        if b[i:i + 9] == b"CHECKSUM=":
            b[i:i + 80] = b" " * 80
        elif b[i:i + 9] == b"DATASUM =":
            b[i + 30:i + 80] = b" " * 50
    return bytes(b)
rc = 0
for f in sorted(glob.glob(os.path.join(sys.argv[1], "frame-*.fits"))):
    g = os.path.join(sys.argv[2], os.path.basename(f))
    a, b = cards(f), cards(g)
    n = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
    print(f"{os.path.basename(f)}: {len(a)} bytes, {n} differ outside the CHECKSUM cards")
    rc |= n != 0
sys.exit(rc)' "$scratch/mpi-device-np$np" "$scratch/mpi-host-np$np"
        step mpi.log 30 "-np $np: spextract compare of frame 1" "${sx[@]}" compare \
            "$scratch/mpi-device-np$np/frame-1.fits" "$scratch/mpi-host-np$np/frame-1.fits"
    done
fi

# --- summary ---
{
    echo "== skipped inside the GPU unit tests:"
    grep -o 'skipping: .*' "$out/gpu-tests.log" 2>/dev/null | sort | uniq -c || echo "  none"
    grep -E '^test result:' "$out/gpu-tests.log" 2>/dev/null
    echo "== total ${SECONDS}s of a ${budget}s budget; $( [ "$failed" = 0 ] && echo 'every step passed' || echo 'some steps FAILED' )"
} | tee -a "$summary"
# Every log names the card, the driver and the commit in its first line.
card=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
header="# card, driver: ${card:-none seen by nvidia-smi} | $(grep -m1 '^commit' "$stage/MANIFEST" | tr -s ' ') | $(date -u +%FT%TZ) $(hostname)"
for f in "$out"/*.log "$summary"; do
    [ -f "$f" ] && { printf '%s\n' "$header" | cat - "$f" >"$f.tmp" && mv "$f.tmp" "$f"; }
done
rm -rf "$scratch"
exit "$failed"
