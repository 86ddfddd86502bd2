#!/usr/bin/env bash
# A private PostgreSQL 15 cluster for the tests: initdb in a temp dir, one free loopback port,
# trust authentication on 127.0.0.1 only. Several clusters can run on one machine at once.
#
#   pg.sh start [--owner PID] [--set NAME=VALUE]... [--tls] [DIR]
#                          start a cluster (DIR default: a new mktemp dir) and print its env
#                          (PG_DIR, PG_PORT, PG_URL); with --owner the cluster stops itself once
#                          PID has exited; --set passes a server setting (e.g. synchronous_commit=off);
#                          --tls also serves TLS with a certificate for 127.0.0.1 and localhost
#                          from a private CA (printed as PG_CA)
#   pg.sh env DIR          print the shell-sourceable variables again
#   pg.sh stop DIR         stop the server (fast shutdown) and remove DIR (PG_KEEP=1 keeps it)
#   pg.sh crash DIR        stop with `pg_ctl stop -m immediate` (no checkpoint: WAL replay at start)
#   pg.sh restart DIR      start a stopped or crashed cluster again on the same port
#   pg.sh install          apt-get postgresql when missing (root only)
#
# initdb and postgres refuse to run as root, so when run as root they run as the `postgres` user
# (created by the Debian package) through runuser; otherwise as the calling user.
set -euo pipefail

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}

log() { printf 'pg: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

install_missing() {
    [ -x "$PGBIN/initdb" ] && return 0
    [ "$(id -u)" = 0 ] || die "PostgreSQL 15 is missing ($PGBIN/initdb); install postgresql as root"
    log "installing postgresql"
    # apt-get must not start the system cluster
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=600 postgresql >&2 || rc=$?
    if [ $rc -ne 0 ]; then
        apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends -o DPkg::Lock::Timeout=600 postgresql >&2 && rc=0
    fi
    [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $rc -eq 0 ] || die "apt-get install postgresql failed"
}

# Runs a PostgreSQL binary as the cluster's owner.
as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

print_env() {
    local r=$1 port
    port=$(cat "$r/port")
    printf 'PG_DIR=%s\nPG_PORT=%s\nPG_URL=postgres://postgres@127.0.0.1:%s/postgres\n' \
        "$r" "$port" "$port"
    if [ -f "$r/tls/ca.pem" ]; then printf 'PG_CA=%s\n' "$r/tls/ca.pem"; fi
}

# A CA and a server certificate for 127.0.0.1/localhost (EC P-256: rustls with ring verifies it).
make_tls() {
    local t=$1/tls
    mkdir -p "$t"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$t/ca.key" -out "$t/ca.pem" -days 30 -subj "/CN=frontdesk pg test CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$t/server.key" -out "$t/server.csr" -subj "/CN=localhost" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n' >"$t/ext.cnf"
    openssl x509 -req -in "$t/server.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial \
        -out "$t/server.pem" -days 30 -extfile "$t/ext.cnf" 2>/dev/null
    chmod 644 "$t/ca.pem" "$t/server.pem"
    chmod 600 "$t/server.key"
    printf 'ssl=on\nssl_cert_file=%s\nssl_key_file=%s\n' "$t/server.pem" "$t/server.key" >>"$1/settings"
}

server_pid() { head -n1 "$1/data/postmaster.pid" 2>/dev/null || true; }

# Starts the server on the port in $r/port; fails when it does not come up (port taken).
start_server() {
    local r=$1 port
    port=$(cat "$r/port")
    local opts="-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$r/run"
    opts+=" -c max_connections=200 -c shared_buffers=32MB -c log_min_messages=warning"
    local s
    if [ -f "$r/settings" ]; then
        while read -r s; do [ -n "$s" ] && opts+=" -c $s"; done <"$r/settings"
    fi
    as_owner "$PGBIN/pg_ctl" -D "$r/data" -l "$r/server.log" -o "$opts" -w -t 30 start >/dev/null 2>&1 ||
        return 1
    pid_alive "$(server_pid "$r")"
}

cmd_start() {
    local owner="" r="" sets=() tls=0
    while [ $# -gt 0 ]; do
        case $1 in
        --owner)
            owner=$2
            shift 2
            ;;
        --set)
            sets+=("$2")
            shift 2
            ;;
        --tls)
            tls=1
            shift
            ;;
        *)
            r=$1
            shift
            ;;
        esac
    done
    install_missing
    if [ -z "$r" ]; then r=$(mktemp -d /tmp/frontdesk-pg.XXXXXX); fi
    mkdir -p "$r/run"
    r=$(cd "$r" && pwd)
    chmod 755 "$r"
    : >"$r/settings"
    local s
    for s in "${sets[@]+"${sets[@]}"}"; do printf '%s\n' "$s" >>"$r/settings"; done
    if [ $tls = 1 ]; then make_tls "$r"; fi
    if [ "$(id -u)" = 0 ]; then chown -R postgres: "$r"; fi
    as_owner "$PGBIN/initdb" -D "$r/data" -U postgres --auth=trust --no-sync -E UTF8 \
        --locale=C.UTF-8 >"$r/initdb.log" 2>&1 || die "initdb failed: $(tail -n5 "$r/initdb.log")"
    local attempt ok=""
    for attempt in 1 2 3 4 5; do
        free_port >"$r/port"
        if start_server "$r"; then
            ok=1
            break
        fi
        log "start attempt $attempt failed; retrying with another port"
    done
    [ -n "$ok" ] || die "could not start PostgreSQL in $r: $(tail -n5 "$r/server.log" 2>/dev/null)"
    if [ -n "$owner" ]; then
        # the watcher becomes `pg.sh stop` by exec, so stop knows not to kill it
        setsid sh -c 'echo $$ >"$1"; while kill -0 "$2" 2>/dev/null; do sleep 1; done; exec "$3" stop "$4"' \
            sh "$r/watcher.pid" "$owner" "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/pg.sh" "$r" \
            </dev/null >>"$r/watcher.log" 2>&1 &
    fi
    log "up in $r (port $(cat "$r/port"))"
    print_env "$r"
}

# Stops the server by its PID: SIGINT is PostgreSQL's fast shutdown, SIGQUIT its immediate one.
stop_server() {
    local r=$1 sig=$2 pid i
    pid=$(server_pid "$r")
    pid_alive "$pid" || return 0
    kill -s "$sig" "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    kill -s KILL "$pid" 2>/dev/null || true
}

cmd_stop() {
    local r=${1:?usage: pg.sh stop DIR}
    [ -f "$r/port" ] || die "$r is not a pg.sh dir"
    local w
    w=$(cat "$r/watcher.pid" 2>/dev/null || true)
    if [ -n "$w" ] && [ "$w" != "$$" ] && pid_alive "$w"; then kill "$w" 2>/dev/null || true; fi
    stop_server "$r" INT
    if [ "${PG_KEEP:-0}" = 1 ]; then
        log "stopped; kept $r"
    else
        rm -rf "$r"
        log "stopped; removed $r"
    fi
}

cmd=${1:-help}
shift || true
case $cmd in
start) cmd_start "$@" ;;
stop) cmd_stop "$@" ;;
env) print_env "${1:?usage: pg.sh env DIR}" ;;
crash)
    r=${1:?usage: pg.sh crash DIR}
    as_owner "$PGBIN/pg_ctl" -D "$r/data" -m immediate -w stop >/dev/null 2>&1 || stop_server "$r" QUIT
    ;;
restart)
    r=${1:?usage: pg.sh restart DIR}
    start_server "$r" || die "restart failed: $(tail -n5 "$r/server.log")"
    ;;
install) install_missing ;;
*)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
