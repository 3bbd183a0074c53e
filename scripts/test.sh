#!/usr/bin/env bash
# Sets up and runs the whole test suite (what CI runs, besides fmt and clippy).
# Tests build on release profile: wasmtime's compiler is ~10x slower as a debug build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
cargo test --release --workspace
