#!/usr/bin/env bash
# The test suite: unit and integration tests, in release mode (the extraction tests solve
# thousands of patches). Tests that need the DESI test files (../shared/data beside the checkout,
# or $SPEXTRACT_TEST_DATA) skip with a message when they are absent.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
export OPENBLAS_NUM_THREADS=1
cargo test --release "$@"
# The Slurm scripts: syntax, #SBATCH lines, and every spextract flag they use against the binary
# cargo test has just built.
tests/slurm/check-scripts.sh "${CARGO_TARGET_DIR:-target}/release/spextract"
# The commands the README and docs/ show: each sh block parses, and each spextract line is one
# the binary accepts.
tests/docs/check-commands.sh "${CARGO_TARGET_DIR:-target}/release/spextract"
