#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the demo and the tests: its data, socket
# and log under target/pg_fence (or $PGFENCE_BASE), its own port
# ($PGFENCE_PORT, default 28815; never 5432), trust auth on loopback only.
# initdb and postgres refuse to run as root, so as root it runs them as the
# `postgres` OS user.
#
#   cluster.sh start     init if needed, start, create database pg_fence
#   cluster.sh stop      fast shutdown
#   cluster.sh crash     immediate shutdown (no checkpoint, unflushed WAL lost)
#   cluster.sh destroy   stop and delete the data directory
#   cluster.sh env       print the connection settings
#
# The server loads pg_fence at start (shared_preload_libraries: preload mode,
# with statistics and the waiter registry) unless PGFENCE_PRELOAD=0; the
# setting is written to pg_fence_mode.conf at every start.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PORT=${PGFENCE_PORT:-28815}
BASE=${PGFENCE_BASE:-$ROOT/target/pg_fence}
PG_BINDIR=$(/usr/lib/postgresql/15/bin/pg_config --bindir 2>/dev/null || pg_config --bindir)
DB=pg_fence

run_pg() {  # run a PostgreSQL server binary as a non-root user
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

prepare_base() {
    mkdir -p "$BASE"
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres:postgres "$BASE"
        if ! runuser -u postgres -- test -w "$BASE"; then
            # A parent directory postgres cannot enter (a 0700 checkout):
            # keep the cluster under /tmp instead, keyed by the checkout.
            BASE=/tmp/pg_fence-$(printf '%s' "$ROOT" | md5sum | cut -c1-12)-$PORT
            mkdir -p "$BASE" && chown postgres:postgres "$BASE"
        fi
    fi
}

DATA() { echo "$BASE/data"; }

case "${1:-}" in
start)
    prepare_base
    data=$(DATA)
    if [ ! -f "$data/PG_VERSION" ]; then
        run_pg "$PG_BINDIR/initdb" -D "$data" -U postgres -A trust -E UTF8 --no-locale >"$BASE/initdb.log"
        mkdir -p "$BASE/run" && { [ "$(id -u)" -ne 0 ] || chown postgres:postgres "$BASE/run"; }
        cat >>"$data/postgresql.conf" <<CONF
# pg_fence throwaway cluster
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$BASE/run'
max_connections = 200
shared_buffers = 256MB
log_min_messages = warning
log_line_prefix = '%m [%p] %q%a '
include_if_exists = 'pg_fence_mode.conf'
CONF
    fi
    if [ "${PGFENCE_PRELOAD:-1}" = 0 ]; then
        echo "# written by cluster.sh start: PGFENCE_PRELOAD=0" >"$data/pg_fence_mode.conf"
    else
        echo "shared_preload_libraries = 'pg_fence'" >"$data/pg_fence_mode.conf"
    fi
    if ! grep -q "include_if_exists = 'pg_fence_mode.conf'" "$data/postgresql.conf"; then
        echo "include_if_exists = 'pg_fence_mode.conf'" >>"$data/postgresql.conf"
    fi
    [ "$(id -u)" -ne 0 ] || chown postgres:postgres "$data/pg_fence_mode.conf"
    # A preloaded library is loaded once, by the postmaster: after `make
    # install` put a newer one in place, restart so the server runs it.
    library="$("$PG_BINDIR/pg_config" --pkglibdir)/pg_fence.so"
    if [ -f "$data/postmaster.pid" ] && [ "$library" -nt "$data/postmaster.pid" ] &&
        run_pg "$PG_BINDIR/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        run_pg "$PG_BINDIR/pg_ctl" -D "$data" -m fast -w stop >/dev/null
    fi
    if ! run_pg "$PG_BINDIR/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        if ! run_pg "$PG_BINDIR/pg_ctl" -D "$data" -l "$BASE/postgres.log" -w -t 60 start >/dev/null; then
            echo "cluster.sh: the server did not start (is port $PORT taken? set PGFENCE_PORT). Log:" >&2
            tail -n 20 "$BASE/postgres.log" >&2
            exit 1
        fi
    fi
    if ! psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -XAtqc "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
        psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -Xqc "CREATE DATABASE $DB" >/dev/null
    fi
    ;;
stop | crash)
    prepare_base
    mode=fast; [ "$1" = crash ] && mode=immediate
    if [ -f "$(DATA)/postmaster.pid" ]; then
        run_pg "$PG_BINDIR/pg_ctl" -D "$(DATA)" -m "$mode" -w stop >/dev/null
    fi
    ;;
destroy)
    "$0" stop || true
    prepare_base
    rm -rf "$(DATA)"
    ;;
env)
    echo "PGHOST=127.0.0.1 PGPORT=$PORT PGUSER=postgres PGDATABASE=$DB"
    ;;
*)
    sed -n '2,15p' "$0"; exit 2 ;;
esac
