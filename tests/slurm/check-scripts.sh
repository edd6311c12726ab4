#!/usr/bin/env bash
# Checks the Slurm scripts in slurm/ without Slurm: each parses, each job script has the #SBATCH
# lines a run needs above its first command, extraction jobs keep BLAS single-threaded and
# stop on a signal srun's tasks receive, module loads come in build order, and every spextract
# flag the scripts use (comments included) is one the binary accepts.
#
#   tests/slurm/check-scripts.sh [path/to/spextract]   (default target/release/spextract)
#
# Stops at the first failure with a message naming the script and the problem.
set -euo pipefail
cd "$(dirname "$0")/../.."

bin=${1:-target/release/spextract}
passed=0

fail() {
    echo "check-scripts: FAIL: $*" >&2
    exit 1
}
ok() {
    echo "ok  $*"
    passed=$((passed + 1))
}

# The value of `#SBATCH --name=value` (or `--name value`) in script $1; empty when absent.
sbatch_value() {
    sed -nE "s/^#SBATCH[[:space:]]+--$2[=[:space:]]+([^[:space:]]+).*$/\\1/p" "$1" | head -n 1
}
has_sbatch() {
    grep -Eq "^#SBATCH[[:space:]]+--$2([=[:space:]]|$)" "$1"
}
# The script's lines with backslash continuations joined, comments dropped.
code_of() {
    sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$1" | grep -Ev '^[[:space:]]*(#|$)' || true
}
first_line() { # first line number in $1 matching the extended regex $2, or empty
    grep -nE -- "$2" "$1" | head -n 1 | cut -d: -f1
}

scripts=(slurm/*.sh)
[ -e "${scripts[0]}" ] || fail "no scripts in slurm/"

for s in "${scripts[@]}"; do
    bash -n "$s" || fail "$s: bash -n found a syntax error"
    [ -x "$s" ] || fail "$s: not executable (chmod +x)"
    ok "$s: parses, executable"

    grep -q '^#SBATCH' "$s" || continue # a script run on the login node, not a job

    # sbatch stops reading #SBATCH lines at the first command: one below it would be ignored.
    last_sbatch=$(grep -n '^#SBATCH' "$s" | tail -n 1 | cut -d: -f1)
    first_cmd=$(grep -nEv '^[[:space:]]*(#|$)' "$s" | head -n 1 | cut -d: -f1)
    if [ -n "$first_cmd" ] && [ "$last_sbatch" -gt "$first_cmd" ]; then
        fail "$s: #SBATCH on line $last_sbatch is below the first command (line $first_cmd)," \
            "so sbatch ignores it"
    fi
    for opt in nodes time ntasks-per-node cpus-per-task output; do
        [ -n "$(sbatch_value "$s" "$opt")" ] || fail "$s: no '#SBATCH --$opt=...' line"
    done
    ok "$s: #SBATCH --nodes --time --ntasks-per-node --cpus-per-task --output, above line $first_cmd"

    order=()
    for placeholder in '<compiler>' '<mpi>' '<spextract>'; do
        n=$(first_line "$s" "^#?[[:space:]]*module load $placeholder")
        [ -n "$n" ] || fail "$s: no '# module load $placeholder' line"
        order+=("$n")
    done
    if ! [ "${order[0]}" -lt "${order[1]}" ] || ! [ "${order[1]}" -lt "${order[2]}" ]; then
        fail "$s: module loads out of order (compiler line ${order[0]}, MPI line ${order[1]}," \
            "application line ${order[2]}): load the compiler, then MPI, then the application"
    fi
    ok "$s: module loads compiler (line ${order[0]}) -> MPI (${order[1]}) -> application (${order[2]})"

    code=$(code_of "$s")
    grep -Eq '(^|[[:space:]"])(\$\{?SPEXTRACT\}?"?|spextract)[[:space:]]+extract([[:space:]]|$)' \
        <<<"$code" || continue # not an extraction job (report.sh)

    signal=$(sbatch_value "$s" signal)
    [ -n "$signal" ] || fail "$s: no '#SBATCH --signal=TERM@SECONDS' line: the run would be" \
        "killed at its time limit without writing its report"
    case "$signal" in
    B:*) fail "$s: --signal=$signal signals only the batch shell, not the spextract ranks" \
        "under srun: use --signal=TERM@SECONDS" ;;
    TERM@[0-9]* | R:TERM@[0-9]* | 15@[0-9]*) ;;
    *) fail "$s: --signal=$signal: spextract stops cleanly on TERM: use --signal=TERM@SECONDS" ;;
    esac
    for var in OMP_NUM_THREADS MKL_NUM_THREADS OPENBLAS_NUM_THREADS; do
        grep -Eq "^[[:space:]]*export([[:space:]]+[A-Za-z_][A-Za-z0-9_]*=[^[:space:]]*)*[[:space:]]+$var=1([[:space:]]|$)" "$s" ||
            fail "$s: $var=1 is not exported (BLAS must stay single-threaded)"
    done
    ok "$s: --signal=$signal; OMP_NUM_THREADS, MKL_NUM_THREADS, OPENBLAS_NUM_THREADS exported as 1"

    ntasks=$(sbatch_value "$s" ntasks-per-node)
    if grep -Eq -- '--backend[= ]gpu' <<<"$code"; then
        gpus=$(sbatch_value "$s" gpus-per-node)
        [ -n "$gpus" ] || fail "$s: a GPU job (--backend gpu) without '#SBATCH --gpus-per-node'"
        gpus=${gpus##*:} # a type may precede the count: a100:4
        [ "$ntasks" -eq $((gpus + 2)) ] ||
            fail "$s: --ntasks-per-node=$ntasks with --gpus-per-node=$gpus: a GPU node runs one" \
                "compute rank per GPU plus a reader and a writer, $((gpus + 2)) tasks"
        ok "$s: GPU job, --gpus-per-node=$gpus, --ntasks-per-node=$ntasks = GPUs + reader + writer"
    else
        [ "$ntasks" -ge 3 ] || fail "$s: --ntasks-per-node=$ntasks leaves no compute rank beside" \
            "the reader and the writer"
        ok "$s: CPU job, --ntasks-per-node=$ntasks = $((ntasks - 2)) compute ranks + reader + writer"
    fi
done

if [ ! -x "$bin" ]; then
    echo "check-scripts: skipping the flag check: $bin is missing (cargo build --release, or" \
        "give the binary's path)"
else
    subcommands=$("$bin" --help | sed -n '/^Commands:/,/^$/p' | awk 'NR > 1 && NF { print $1 }')
    [ -n "$subcommands" ] || fail "$bin --help lists no subcommands"
    # A command line: the binary (by name or through $SPEXTRACT), a subcommand, then its flags.
    re='(^|[[:space:]"(])("?\$\{?SPEXTRACT\}?"?|spextract)[[:space:]]+([a-z]+)([[:space:]].*)?$'
    for s in "${scripts[@]}"; do
        checked=()
        while IFS= read -r line; do
            [[ $line =~ $re ]] || continue
            sub=${BASH_REMATCH[3]}
            rest=${BASH_REMATCH[4]}
            if ! grep -qx -- "$sub" <<<"$subcommands"; then
                # Prose in a comment ("spextract threads itself") is not a command line; a
                # command that is must name a real subcommand.
                [[ $line =~ ^[[:space:]]*# ]] && continue
                fail "$s: '$sub' is not a spextract subcommand: ${line#"${line%%[![:space:]]*}"}"
            fi
            help=$("$bin" "$sub" --help)
            # Flags stand after a space, or inside ${VAR:+--flag ...}.
            flags=$(grep -oE -- '(^|[[:space:]+])--[a-z][a-z0-9-]*' <<<"$rest" | sed -E 's/^[^-]*//' || true)
            for flag in $flags; do
                grep -Eq -- "(^|[[:space:],])$flag([[:space:],=]|$)" <<<"$help" ||
                    fail "$s: 'spextract $sub' has no flag $flag (see $bin $sub --help)"
                checked+=("$sub $flag")
            done
        done < <(sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$s")
        [ ${#checked[@]} -gt 0 ] || fail "$s: no spextract flags found to check"
        ok "$s: flags accepted by $bin: $(printf '%s\n' "${checked[@]}" | sort -u |
            awk '{ f[$1] = f[$1] " " $2 } END { for (c in f) { printf "%s%s%s", sep, c, f[c]; sep = "; " } }')"
    done
fi
echo "check-scripts: $passed passed, 0 failed"
