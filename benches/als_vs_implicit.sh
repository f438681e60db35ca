#!/usr/bin/env bash
# Quality and speed benchmark: shoal's distributed implicit ALS against implicit
# (CPU, conjugate gradient) on the same train / test split. See benches/README.md.
#
#   benches/als_vs_implicit.sh [extra arguments of als_vs_implicit.py]
#
# Sets up (or reuses) the Python venv target/bench-venv, builds shoal in release
# mode, then runs benches/als_vs_implicit.py, which prints the table and exits
# non-zero when a target is missed. Honours CARGO_TARGET_DIR.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bin="${CARGO_TARGET_DIR:-target}/release/shoal"

# shellcheck source=benches/venv.sh
source benches/venv.sh
bench_venv als benches/requirements-als.txt benches/requirements.txt

echo "==> cargo build --release" >&2
cargo build --release --bin shoal

echo "==> shoal vs implicit" >&2
exec env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 \
    "$venv/bin/python" benches/als_vs_implicit.py --shoal "$bin" "$@"
