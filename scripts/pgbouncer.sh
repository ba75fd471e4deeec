#!/usr/bin/env bash
# A PgBouncer in transaction mode in front of the test cluster, for the
# pooler tier (make test-pgbouncer): Debian 12's PgBouncer (1.18, which
# keeps no prepared statements across transactions), listening on
# 127.0.0.1:$PGFENCE_POOLER_PORT (default 28830), any database of the
# cluster on $PGFENCE_PORT (default 28815), trust auth on loopback. Its
# settings are PgBouncer's defaults but for pool_mode = transaction and
# ignore_startup_parameters = extra_float_digits, which sqlx sends at
# connect and PgBouncer refuses otherwise (its usual setting for sqlx and
# JDBC clients: nothing of pg_fence's).
#
#   pgbouncer.sh start   write the config, start it (as the postgres user when root)
#   pgbouncer.sh stop    stop it
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PORT=${PGFENCE_POOLER_PORT:-28830}
PG_PORT=${PGFENCE_PORT:-28815}
BASE=${PGFENCE_POOLER_BASE:-/tmp/pg_fence-pgbouncer-$PORT}

run_as() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

case "${1:-}" in
start)
    command -v pgbouncer >/dev/null || { echo "pgbouncer.sh: pgbouncer is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
    mkdir -p "$BASE"
    [ "$(id -u)" -ne 0 ] || chown postgres:postgres "$BASE"
    # Always this config: a PgBouncer left running (with other settings) goes.
    "$0" stop
    cat >"$BASE/pgbouncer.ini" <<CONF
[databases]
* = host=127.0.0.1 port=$PG_PORT

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PORT
unix_socket_dir =
auth_type = trust
auth_file = $BASE/userlist.txt
pool_mode = transaction
ignore_startup_parameters = extra_float_digits
max_client_conn = 400
logfile = $BASE/pgbouncer.log
pidfile = $BASE/pgbouncer.pid
admin_users = postgres
CONF
    printf '"postgres" ""\n' >"$BASE/userlist.txt"
    [ "$(id -u)" -ne 0 ] || chown postgres:postgres "$BASE/pgbouncer.ini" "$BASE/userlist.txt"
    run_as pgbouncer -d "$BASE/pgbouncer.ini"
    for _ in $(seq 1 50); do
        if psql -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d pg_fence -c 'SELECT 1' >/dev/null 2>&1; then
            exit 0
        fi
        sleep 0.1
    done
    echo "pgbouncer.sh: PgBouncer did not start. Log:" >&2
    tail -n 20 "$BASE/pgbouncer.log" >&2 || true
    exit 1
    ;;
stop)
    if [ -f "$BASE/pgbouncer.pid" ]; then
        pid=$(cat "$BASE/pgbouncer.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        rm -f "$BASE/pgbouncer.pid"
    fi
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
