#!/usr/bin/env bash
# Installs what building and testing pg_fence needs, on a Debian 12 machine
# that has only the Rust toolchain: PostgreSQL 15 and its server headers,
# Prometheus' PostgreSQL exporter,
# libclang (pgrx's bindgen), sudo (cargo-pgrx runs `sudo` for --runas),
# the pinned cargo-pgrx, and `cargo pgrx init` against the system PostgreSQL.
# Idempotent: it only does what is missing, so `make` targets call it freely.
set -euo pipefail
cd "$(dirname "$0")/.."

PGRX_VERSION=$(sed -n 's/^pgrx = "=\(.*\)"$/\1/p' Cargo.toml)
PG_MAJOR=15
# prometheus-postgres-exporter: the exporter tier (tests/tests/exporter.rs)
# runs the real one with monitoring/postgres_exporter_queries.yaml; pgbouncer:
# the pooler tier (scripts/pgbouncer.sh, make test-pgbouncer); python3-psycopg:
# the Python example (examples/python); patroni, etcd-server (and python3-etcd,
# which patroni's etcd3 store imports), curl: the Patroni tier
# (scripts/patroni.sh, make test-patroni).
APT_PACKAGES=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR libclang-dev clang sudo pkg-config
              prometheus-postgres-exporter pgbouncer python3-psycopg
              patroni python3-etcd etcd-server curl)
# `scripts/setup.sh --bench` (make bench) also wants Redis, the other side of
# one comparison, and gnuplot for the hot-key latency plot.
if [ "${1:-}" = "--bench" ]; then
    APT_PACKAGES+=(redis-server gnuplot-nox)
fi

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    # The postgresql package would start a cluster on 5432; we never use it.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/$PG_MAJOR/bin/pg_config}
[ -x "$PG_CONFIG" ] || PG_CONFIG=$(command -v pg_config)

if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION\$"; then
    log "installing cargo-pgrx $PGRX_VERSION (takes about 6 minutes, once)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

PGRX_HOME=${PGRX_HOME:-$HOME/.pgrx}
if ! grep -qs "^pg$PG_MAJOR = \"$PG_CONFIG\"" "$PGRX_HOME/config.toml"; then
    log "cargo pgrx init --pg$PG_MAJOR $PG_CONFIG"
    cargo pgrx init --pg$PG_MAJOR "$PG_CONFIG"
fi
