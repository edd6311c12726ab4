#!/usr/bin/env bash
# The test suite: unit and integration tests, in release mode (the extraction tests solve
# thousands of patches). Tests that need ../shared/data skip with a message when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
export OPENBLAS_NUM_THREADS=1
cargo test --release "$@"
# The Slurm scripts: syntax, #SBATCH lines, and every spextract flag they use against the binary
# cargo test has just built.
tests/slurm/check-scripts.sh "${CARGO_TARGET_DIR:-target}/release/spextract"
