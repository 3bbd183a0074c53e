#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback for the tests and the registry benchmark, from
# Debian's packages (scripts/setup.sh --test installs them). Password authentication
# (SCRAM) over TCP, as a deployment would use; data in a temporary directory.
#
#   scripts/postgres.sh start DIR PORT   → prints postgres://amicus:amicus@127.0.0.1:PORT/postgres
#   scripts/postgres.sh stop DIR
set -euo pipefail
cmd=${1:?start or stop}
dir=${2:?data directory}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$bin" ] || { echo "postgres.sh: PostgreSQL is not installed (scripts/setup.sh --test)" >&2; exit 1; }
# PostgreSQL refuses to run as root: run it as the postgres user Debian's package created.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case "$cmd" in
  start)
    port=${3:?port}
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    if [ ! -f "$dir/PG_VERSION" ]; then
      pw="$dir.pw"
      echo amicus > "$pw"
      [ "$(id -u)" = 0 ] && chown postgres "$pw"
      as_pg "$bin/initdb" -D "$dir" -U amicus --pwfile="$pw" --auth-local=scram-sha-256 \
        --auth-host=scram-sha-256 -E UTF8 >/dev/null
      rm -f "$pw"
    fi
    as_pg "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off" start >/dev/null
    echo "postgres://amicus:amicus@127.0.0.1:$port/postgres"
    ;;
  stop)
    as_pg "$bin/pg_ctl" -D "$dir" -m fast stop >/dev/null 2>&1 || true
    ;;
  *) echo "usage: postgres.sh start DIR PORT | stop DIR" >&2; exit 2 ;;
esac
