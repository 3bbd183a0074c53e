#!/usr/bin/env bash
# Installs what amicus needs to build and test, idempotently:
# - the wasm32-wasip2 Rust target (trains are WebAssembly components).
# Later parts add the ONNX Runtime library (from the PyPI wheel) and Debian packages here.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi
if command -v rustup >/dev/null; then
  if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "setup: installing the wasm32-wasip2 target"
    rustup target add wasm32-wasip2
  fi
else
  echo "setup: rustup not found; make sure the wasm32-wasip2 target is installed" >&2
fi
