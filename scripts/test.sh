#!/usr/bin/env bash
# Sets up and runs the whole test suite (what CI runs, besides fmt and clippy).
# Tests build on release profile: wasmtime's compiler is ~10x slower as a debug build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test

# The registry's API suite runs on PostgreSQL too: a throwaway server on loopback.
pgdir=$(mktemp -d /tmp/amicus-pg.XXXXXX)
trap 'bash scripts/postgres.sh stop "$pgdir/data"; rm -rf "$pgdir"' EXIT
chmod 755 "$pgdir"
pgport=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
AMICUS_TEST_POSTGRES=$(bash scripts/postgres.sh start "$pgdir/data" "$pgport")
export AMICUS_TEST_POSTGRES
export AMICUS_REQUIRE_POSTGRES=1

cargo test --release --workspace --no-fail-fast
