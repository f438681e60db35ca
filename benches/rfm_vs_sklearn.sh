#!/usr/bin/env bash
# Whole-job benchmark: shoal's k-means on the Online Retail RFM features against
# scikit-learn's KMeans on the same feature matrix. See benches/README.md.
#
#   benches/rfm_vs_sklearn.sh        (from any directory)
#
# Sets up (or reuses) a Python venv in target/bench-venv, builds shoal in release mode,
# runs the job in benches/rfm_vs_sklearn.toml (output: target/bench-out/rfm), then
# runs benches/rfm_vs_sklearn.py, which prints the comparison table and exits
# non-zero when a check fails. Honours CARGO_TARGET_DIR for the shoal binary.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

spec="benches/rfm_vs_sklearn.toml"
out="target/bench-out/rfm" # must match [output] path in $spec
bin="${CARGO_TARGET_DIR:-target}/release/shoal"

# shellcheck source=benches/venv.sh
source benches/venv.sh
bench_venv rfm benches/requirements.txt

# --- shoal
echo "==> cargo build --release" >&2
cargo build --release --workspace

echo "==> $bin run $spec" >&2
rm -rf "$out"
"$bin" run "$spec"

# --- comparison
echo "==> comparing with scikit-learn" >&2
exec "$venv/bin/python" benches/rfm_vs_sklearn.py --spec "$spec" --output "$out"
