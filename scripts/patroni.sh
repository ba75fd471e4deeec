#!/usr/bin/env bash
# A real Patroni cluster for the failover tier (make test-patroni): Debian
# 12's patroni (3.0) with etcd-server (3.4) as its store, two PostgreSQL 15
# nodes with pg_fence preloaded, synchronous_mode on. Everything on
# loopback, under $PGFENCE_PATRONI_BASE (default /tmp/pg_fence-patroni):
#
#   etcd        client 127.0.0.1:28840, peer 28841
#   node1       PostgreSQL 127.0.0.1:28861, Patroni REST 127.0.0.1:28871
#   node2       PostgreSQL 127.0.0.1:28862, Patroni REST 127.0.0.1:28872
#
# Patroni runs as the postgres OS user (PostgreSQL refuses root).
#
#   patroni.sh start       from scratch: etcd, both nodes; waits for a leader
#                          and a synchronous standby, creates database pg_fence
#   patroni.sh leader      the leader's node name
#   patroni.sh kill NODE   SIGKILL the node's Patroni and its postmaster (the
#                          machine dying): the other node takes over once the
#                          leader key expires (ttl 10 s)
#   patroni.sh wait-leader NODE   wait until NODE leads and accepts writes
#   patroni.sh stop        stop everything and delete it
set -euo pipefail
BASE=${PGFENCE_PATRONI_BASE:-/tmp/pg_fence-patroni}
BIN=$(/usr/lib/postgresql/15/bin/pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)

run_as() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_port() { case "$1" in node1) echo 28861 ;; node2) echo 28862 ;; esac; }
rest_port() { case "$1" in node1) echo 28871 ;; node2) echo 28872 ;; esac; }

node_config() {
    local node=$1
    cat >"$BASE/$node.yml" <<CONF
scope: pg_fence
name: $node
log:
  level: WARNING
  dir: $BASE/$node-log
restapi:
  listen: 127.0.0.1:$(rest_port "$node")
  connect_address: 127.0.0.1:$(rest_port "$node")
etcd3:
  hosts: 127.0.0.1:28840
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 4
    # Synchronous mode decides who may take over; a lag check against the
    # dead leader's last report could only block the failover.
    maximum_lag_on_failover: 1073741824
    synchronous_mode: true
    postgresql:
      use_pg_rewind: false
      parameters:
        shared_preload_libraries: pg_fence
        synchronous_commit: 'on'
        wal_level: replica
        hot_standby: 'on'
        max_wal_senders: 5
        max_replication_slots: 5
        max_prepared_transactions: 10
        wal_keep_size: 128MB
        fsync: 'on'
  initdb:
    - encoding: UTF8
    - no-locale
  pg_hba:
    - host all all 127.0.0.1/32 trust
    - host replication all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:$(pg_port "$node")
  connect_address: 127.0.0.1:$(pg_port "$node")
  data_dir: $BASE/$node
  bin_dir: $BIN
  pgpass: $BASE/$node.pgpass
  # No passwords: trust on loopback (an empty one makes initdb fail).
  authentication:
    superuser:
      username: postgres
    replication:
      username: postgres
  parameters:
    unix_socket_directories: '$BASE'
    log_min_messages: warning
tags:
  nofailover: false
  noloadbalance: false
  clonefrom: false
CONF
    mkdir -p "$BASE/$node-log"
}

leader() {
    for node in node1 node2; do
        if curl -sf "http://127.0.0.1:$(rest_port "$node")/primary" >/dev/null 2>&1; then
            echo "$node"
            return 0
        fi
    done
    return 1
}

writable() {
    psql -X -At -h 127.0.0.1 -p "$(pg_port "$1")" -U postgres -d postgres \
        -c 'SELECT NOT pg_is_in_recovery()' 2>/dev/null | grep -q t
}

sync_standby() {
    local node=$1
    psql -X -At -h 127.0.0.1 -p "$(pg_port "$node")" -U postgres -d postgres \
        -c "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'" 2>/dev/null | grep -q '^1$'
}

case "${1:-}" in
start)
    for command in patroni etcd curl; do
        command -v "$command" >/dev/null || { echo "patroni.sh: $command is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
    done
    "$0" stop
    mkdir -p "$BASE"
    etcd --name pg_fence --data-dir "$BASE/etcd" \
        --listen-client-urls http://127.0.0.1:28840 --advertise-client-urls http://127.0.0.1:28840 \
        --listen-peer-urls http://127.0.0.1:28841 --initial-advertise-peer-urls http://127.0.0.1:28841 \
        --initial-cluster pg_fence=http://127.0.0.1:28841 \
        >"$BASE/etcd.log" 2>&1 &
    echo $! >"$BASE/etcd.pid"
    for _ in $(seq 1 100); do
        curl -sf http://127.0.0.1:28840/health >/dev/null 2>&1 && break
        sleep 0.1
    done
    curl -sf http://127.0.0.1:28840/health >/dev/null || { echo "patroni.sh: etcd did not start:" >&2; tail -n 20 "$BASE/etcd.log" >&2; exit 1; }
    [ "$(id -u)" -ne 0 ] || chown postgres:postgres "$BASE"
    for node in node1 node2; do
        node_config "$node"
        [ "$(id -u)" -ne 0 ] || chown -R postgres:postgres "$BASE/$node.yml" "$BASE/$node-log"
        run_as bash -c "patroni '$BASE/$node.yml' >'$BASE/$node-patroni.out' 2>&1 & echo \$! >'$BASE/$node-patroni.pid'"
        # node1 bootstraps first, so it leads; node2 then clones it.
        if [ "$node" = node1 ]; then
            for _ in $(seq 1 300); do
                writable node1 && break
                sleep 0.2
            done
            writable node1 || { echo "patroni.sh: node1 did not become the leader:" >&2; tail -n 30 "$BASE/node1-patroni.out" >&2; exit 1; }
        fi
    done
    for _ in $(seq 1 300); do
        sync_standby node1 && break
        sleep 0.2
    done
    sync_standby node1 || { echo "patroni.sh: node2 did not become a synchronous standby:" >&2; tail -n 30 "$BASE/node2-patroni.out" >&2; exit 1; }
    psql -X -q -h 127.0.0.1 -p 28861 -U postgres -d postgres -c 'CREATE DATABASE pg_fence'
    ;;
leader)
    leader
    ;;
wait-leader)
    node=$2
    for _ in $(seq 1 600); do
        if [ "$(leader 2>/dev/null || true)" = "$node" ] && writable "$node"; then
            exit 0
        fi
        sleep 0.1
    done
    echo "patroni.sh: $node did not take over" >&2
    exit 1
    ;;
kill)
    node=$2
    [ -f "$BASE/$node-patroni.pid" ] && kill -KILL "$(cat "$BASE/$node-patroni.pid")" 2>/dev/null || true
    if [ -f "$BASE/$node/postmaster.pid" ]; then
        kill -KILL "$(head -n 1 "$BASE/$node/postmaster.pid")" 2>/dev/null || true
    fi
    ;;
stop)
    for node in node1 node2; do
        [ -f "$BASE/$node-patroni.pid" ] && kill -KILL "$(cat "$BASE/$node-patroni.pid")" 2>/dev/null || true
        if [ -f "$BASE/$node/postmaster.pid" ]; then
            kill -KILL "$(head -n 1 "$BASE/$node/postmaster.pid")" 2>/dev/null || true
        fi
    done
    if [ -f "$BASE/etcd.pid" ]; then
        etcd_pid=$(cat "$BASE/etcd.pid")
        kill "$etcd_pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$etcd_pid" 2>/dev/null || break
            # A zombie (its parent, this script's earlier run, is gone) is dead.
            [ "$(ps -o stat= -p "$etcd_pid" 2>/dev/null | cut -c1)" = Z ] && break
            sleep 0.1
        done
    fi
    # Backends of a killed postmaster exit on their own; wait for them.
    for _ in $(seq 1 50); do
        pgrep -f "$BASE/node" >/dev/null 2>&1 || break
        sleep 0.1
    done
    rm -rf "$BASE"
    ;;
*)
    echo "usage: $0 start|leader|wait-leader NODE|kill NODE|stop" >&2
    exit 2
    ;;
esac
