#!/usr/bin/env bash
# Checks the commands the documentation shows: every ```sh block of README.md, docs/*.md,
# slurm/README.md and kernels/README.md parses as bash (`bash -n`), and every `spextract …`
# command line in them (also after a prefix such as `mpirun -n 8` or `srun`) names a real
# subcommand whose flags the binary accepts: each flag is looked up in `spextract SUB --help`,
# as tests/slurm/check-scripts.sh does for the batch scripts, and then the whole line is parsed
# by the binary itself (`spextract SUB ARGS… --help`, shell variables replaced by 1), which
# also rejects a value a flag cannot take.
#
#   tests/docs/check-commands.sh [path/to/spextract [FILE.md …]]   (default target/release/spextract)
#
# Stops at the first failure with a message naming the file, the line and the problem.
set -euo pipefail
cd "$(dirname "$0")/../.."

bin=${1:-target/release/spextract}
shift || true
if [ $# -gt 0 ]; then
    files=("$@")
else
    files=(README.md docs/*.md slurm/README.md kernels/README.md)
fi

fail() {
    echo "check-commands: FAIL: $*" >&2
    exit 1
}

if [ ! -x "$bin" ]; then
    echo "check-commands: skipping: $bin is missing (cargo build --release, or give the" \
        "binary's path)"
    exit 0
fi

subcommands=$("$bin" --help | sed -n '/^Commands:/,/^$/p' | awk 'NR > 1 && NF { print $1 }')
[ -n "$subcommands" ] || fail "$bin --help lists no subcommands"

# The ```sh blocks of file $1, each line as `LINENO<TAB>text`, blocks separated by a line
# holding only `--`; backslash continuations are joined onto the line that starts them.
sh_blocks() {
    awk '
        /^```sh[[:space:]]*$/ { inside = 1; next }
        inside && /^```/ { inside = 0; if (pending != "") print start "\t" pending; pending = ""; print "--"; next }
        inside {
            line = $0
            if (pending == "") start = NR
            if (line ~ /\\$/) { sub(/\\$/, "", line); pending = pending line; next }
            print start "\t" pending line
            pending = ""
        }
        END { if (inside) print "UNCLOSED" }
    ' "$1"
}

# A command line: the binary by name (or a path ending in it), a subcommand, then the rest.
re='(^|[[:space:]/;&|(])spextract[[:space:]]+([a-z][a-z-]*)([[:space:]].*)?$'

# Checks one line of a block; prints why and returns 1 when it does not parse.
check_line() {
    local line=$1 sub rest help flag words=()
    # A trailing comment is not part of the command.
    line=$(sed -E 's/(^|[[:space:]])#.*$//' <<<"$line")
    [[ $line =~ $re ]] || return 2
    sub=${BASH_REMATCH[2]}
    rest=${BASH_REMATCH[3]}
    # The command ends where another begins or its output is redirected.
    rest=$(sed -E 's/[[:space:]]*(\||;|&&|>|<).*$//' <<<"$rest")
    if ! grep -qx -- "$sub" <<<"$subcommands"; then
        echo "'$sub' is not a spextract subcommand"
        return 1
    fi
    help=$("$bin" "$sub" --help)
    for flag in $(grep -oE -- '(^|[[:space:]])--?[A-Za-z][A-Za-z0-9-]*' <<<"$rest" | sed -E 's/^[[:space:]]*//'); do
        if [[ $flag == --* ]]; then
            grep -Eq -- "(^|[[:space:],])$flag([[:space:],=]|$)" <<<"$help" || {
                echo "'spextract $sub' has no flag $flag (see $bin $sub --help)"
                return 1
            }
        else
            [ ${#flag} -eq 2 ] && grep -Eq -- "(^|[[:space:]])$flag," <<<"$help" || {
                echo "'spextract $sub' has no short flag $flag (see $bin $sub --help)"
                return 1
            }
        fi
    done
    # The binary's own parser, on the words as the shell would split them (quotes honoured,
    # nothing expanded or run), with every $VAR / ${VAR} standing for 1.
    rest=$(sed -E 's/\$\{?[A-Za-z_][A-Za-z0-9_]*\}?/1/g' <<<"$rest")
    if [ -n "${rest//[[:space:]]/}" ]; then
        mapfile -t words < <(xargs -n 1 printf '%s\n' <<<"$rest") || {
            echo "the arguments do not split as shell words"
            return 1
        }
    fi
    local out
    if ! out=$("$bin" "$sub" "${words[@]}" --help 2>&1 >/dev/null); then
        echo "the binary refuses it: $(grep -m 1 -E '^error' <<<"$out" || head -n 1 <<<"$out")"
        return 1
    fi
    return 0
}

# The checker must catch what it is for, or it checks nothing.
for bad in 'spextract extract --no-such-flag x' 'spextract extract -Q 1' \
    'mpirun -n 2 spextract frobnicate --x' 'spextract extract --threads many'; do
    if check_line "$bad" >/dev/null; then
        fail "self-check: '$bad' was accepted"
    fi
done
check_line 'srun spextract extract --frames f.txt --threads $N   # comment' >/dev/null ||
    fail "self-check: a good command line was refused"

ncmd=0
nfiles=0
for f in "${files[@]}"; do
    [ -f "$f" ] || fail "$f: no such file"
    blocks=$(sh_blocks "$f")
    [ "$blocks" != "${blocks%UNCLOSED}" ] && fail "$f: a \`\`\`sh block is not closed"
    [ -n "$blocks" ] || continue
    nfiles=$((nfiles + 1))
    # bash -n on each block, as written.
    block=""
    first=""
    while IFS= read -r entry; do
        if [ "$entry" = "--" ]; then
            bash -n <<<"$block" 2>/dev/null || fail "$f: the sh block at line $first does not parse as bash"
            block=""
            first=""
            continue
        fi
        n=${entry%%$'\t'*}
        text=${entry#*$'\t'}
        [ -n "$first" ] || first=$n
        block+="$text"$'\n'
        set +e
        why=$(check_line "$text")
        rc=$?
        set -e
        case $rc in
        0) ncmd=$((ncmd + 1)) ;;
        2) ;; # not a spextract command line
        *) fail "$f:$n: $why: ${text#"${text%%[![:space:]]*}"}" ;;
        esac
    done <<<"$blocks"
done
[ "$ncmd" -gt 0 ] || fail "no spextract command found in ${files[*]}"
echo "check-commands: $ncmd spextract commands in $nfiles files parse"
