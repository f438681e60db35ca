#!/usr/bin/env bash
# Runs every test of the workspace: unit tests and the whole-system tests in tests/
# (real gRPC servers on 127.0.0.1, real files through object_store, worker processes).
# Needs only the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked "$@"
