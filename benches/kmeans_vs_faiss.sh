#!/usr/bin/env bash
# Speed benchmark: one Lloyd iteration of shoal's CPU backend against faiss-cpu and
# scikit-learn on the same points from the same initial centroids. See
# benches/README.md.
#
#   benches/kmeans_vs_faiss.sh [extra arguments of kmeans_vs_faiss.py]
#
# Sets up (or reuses) the Python venv target/bench-venv, builds shoal in release
# mode, then runs benches/kmeans_vs_faiss.py, which runs `shoal bench kmeans` for
# every size, faiss and scikit-learn on the .npy files it writes, prints the table
# and exits non-zero when a target is missed. Honours CARGO_TARGET_DIR.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bin="${CARGO_TARGET_DIR:-target}/release/shoal"

# shellcheck source=benches/venv.sh
source benches/venv.sh
bench_venv kmeans benches/requirements-kmeans.txt benches/requirements.txt

# --- shoal
echo "==> cargo build --release" >&2
cargo build --release --bin shoal

# --- comparison. OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, when the machine sets them,
# --- slow a current OpenBLAS down: unset here only (the table names the kernel used).
echo "==> shoal vs faiss-cpu vs scikit-learn" >&2
exec env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
    "$venv/bin/python" benches/kmeans_vs_faiss.py --shoal "$bin" "$@"
