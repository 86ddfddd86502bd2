#!/usr/bin/env bash
# Durable webhook ingest vs the HTTP ceiling, in the same run on the same machine.
#
#   bench/webhook.sh                      # builds target/release/frontdesk if FRONTDESK_BIN is unset
#
# Targets, each measured with wrk (THREADS=2, CONNS=64, DURATION=10 s, after a 2 s warm-up):
#   nginx-204 : a private nginx (1 worker) answering `return 204` -> the HTTP ceiling here
#   frontdesk : `frontdesk run` with one `json` source authenticated by hmac-sha256; every request
#               is a ~1.5 KB JSON body with a fresh unique id and a valid signature, computed in
#               wrk's LuaJIT (bench/wrk_signed.lua); 2xx only after the row is fsync'd
#               (WAL + synchronous=FULL, group commit).
# Both targets get the same Lua script, so the signing cost on the client side is the same.
# Prints acknowledged req/s, p50, p99, errors, rows stored, and the frontdesk/nginx ratio.
# Knobs: DURATION THREADS CONNS FRONTDESK_BIN WORK (scratch dir, default a fresh mktemp -d).
# PG_REPLICAS=2 adds a third target in the same run: two `frontdesk run` replicas sharing one
# private PostgreSQL 15 (tests/servers/pg.sh), each loaded by its own wrk with half the
# connections (a load balancer's even split); their acked req/s are summed and compared with the
# one SQLite replica.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
DURATION=${DURATION:-10}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
# A scratch dir the script made is removed on exit (each run leaves ~400 MB of state); one given
# in WORK is kept for inspection.
if [ -z "${WORK:-}" ]; then
    WORK=$(mktemp -d /tmp/frontdesk-bench.XXXXXX)
    OWN_WORK=1
else
    OWN_WORK=0
fi
SECRET=bench-secret

command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "nginx is needed (apt-get install nginx-light)" >&2; exit 1; }

if [ -z "${FRONTDESK_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release --locked --bin frontdesk >&2)
    FRONTDESK_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/frontdesk"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
    echo "nothing listening on port $1" >&2; return 1
}

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    if [ "$OWN_WORK" = 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

# --- nginx: the HTTP ceiling ---
NGINX_PORT=$(free_port)
mkdir -p "$WORK/nginx/tmp"
cat > "$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        location / { return 204; }
    }
}
EOF
"$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' </dev/null >"$WORK/nginx/stdout.log" 2>&1 &
NGINX_PID=$!
PIDS+=($NGINX_PID)
wait_port "$NGINX_PORT"

# --- frontdesk ---
FD_PORT=$(free_port)
printf '%s' "$SECRET" > "$WORK/secret"; chmod 600 "$WORK/secret"
cat > "$WORK/frontdesk.yaml" <<EOF
timezone: UTC
storage:
  sqlite: $WORK/state/frontdesk.db
server:
  listen: 127.0.0.1:$FD_PORT
sources:
  - name: bench
    webhook:
      preset: json
      auth: { scheme: hmac-sha256, header: X-Signature, prefix: "sha256=", encoding: hex, secret_file: $WORK/secret }
      mapping: { id: /id, from: /customer/email, name: /customer/name, subject: /subject, text: /text }
channels:
  - name: out
    email: { file: $WORK/outbox, from: "fd <fd@example.test>", to: [owner@example.test] }
EOF
FRONTDESK_LOG=warn "$FRONTDESK_BIN" run --config "$WORK/frontdesk.yaml" </dev/null >"$WORK/daemon.log" 2>&1 &
FD_PID=$!
PIDS+=($FD_PID)
wait_port "$FD_PORT"

rows() { python3 -c "import sqlite3,sys; print(sqlite3.connect('file:$WORK/state/frontdesk.db?mode=ro', uri=True).execute('select count(*) from messages').fetchone()[0])"; }
fsync_probe() {  # median fsync latency of 4 KiB appends, in ms: fsync-bound figures scale with it
    python3 - "$WORK" <<'EOF'
import os, sys, time, statistics
p = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
t = []
for _ in range(50):
    os.write(fd, b"x" * 4096); a = time.perf_counter(); os.fsync(fd); t.append(time.perf_counter() - a)
os.close(fd); os.unlink(p)
t.sort(); print(f"fsync p50 {statistics.median(t)*1e3:.2f} ms, p99 {t[int(len(t)*0.99)-1]*1e3:.2f} ms, load {open('/proc/loadavg').read().split()[0]}")
EOF
}

ticks() {  # CPU ticks (user+sys) of a process and its direct children
    local t=0 c
    for c in "$1" $(ps -o pid= --ppid "$1" 2>/dev/null); do
        [ -r "/proc/$c/stat" ] && t=$((t + $(awk '{print $14+$15}' "/proc/$c/stat")))
    done
    echo "$t"
}

run_wrk() {  # run_wrk NAME URL PID -> prints one TSV row
    local name=$1 url=$2 pid=$3
    wrk -t"$THREADS" -c"$CONNS" -d2s -s "$BENCH_DIR/wrk_signed.lua" "$url" >"$WORK/$name.warmup.log" 2>&1 || true
    local before after
    before=$( [ "$name" = frontdesk ] && rows || echo 0)
    local t0; t0=$(ticks "$pid")
    wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --timeout 5s -s "$BENCH_DIR/wrk_signed.lua" "$url" >"$WORK/$name.log" 2>&1
    after=$( [ "$name" = frontdesk ] && rows || echo 0)
    local cpu=$(( $(ticks "$pid") - t0 ))
    local j; j=$(grep '^WRKJSON ' "$WORK/$name.log" | tail -1 | cut -d' ' -f2-)
    python3 - "$name" "$j" "$((after - before))" "$cpu" "$(getconf CLK_TCK)" <<'EOF'
import json, sys
name, j, stored = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
cpu_us = int(sys.argv[4]) / int(sys.argv[5]) * 1e6 / max(j["requests"], 1)
acked = j["requests"] - j["non2xx"]
print("\t".join(str(x) for x in [name, j["requests"], f'{acked / j["duration_s"]:.0f}', f'{j["p50_ms"]:.2f}',
      f'{j["p99_ms"]:.2f}', j["non2xx"], j["socket_errors"], j["timeouts"], stored if name == "frontdesk" else "-", f"{cpu_us:.1f}", j["body_bytes"]]))
EOF
}

echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ)  $(nproc) cores  wrk -t$THREADS -c$CONNS -d${DURATION}s  (scratch: $WORK)"
echo "# before: $(fsync_probe)"
NGINX_ROW=$(run_wrk nginx-204 "http://127.0.0.1:$NGINX_PORT/hooks/bench" "$NGINX_PID")
FD_ROW=$(run_wrk frontdesk "http://127.0.0.1:$FD_PORT/hooks/bench" "$FD_PID")
echo "# after:  $(fsync_probe)"
# Whether the core loop kept up (messages still queued for it at the end) and the WAL stayed small.
python3 - "$WORK/state/frontdesk.db" <<'EOF'
import os, sqlite3, sys
db = sys.argv[1]
c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
backlog = c.execute("select count(*) from core_queue").fetchone()[0]
convs = c.execute("select count(*) from conversations").fetchone()[0]
wal = os.path.getsize(db + "-wal") if os.path.exists(db + "-wal") else 0
print(f"# core backlog at the end: {backlog} messages; conversations: {convs}; WAL: {wal / 2**20:.1f} MiB")
EOF
printf 'target\trequests\tacked_rps\tp50_ms\tp99_ms\tnon2xx\tsocket_errors\ttimeouts\trows_stored\tserver_cpu_us_per_req\tbody_bytes\n'
printf '%s\n%s\n' "$NGINX_ROW" "$FD_ROW"
if [ "${PG_REPLICAS:-0}" -gt 0 ]; then
    PG_ENV=$("$ROOT/tests/servers/pg.sh" start --owner $$)
    eval "$PG_ENV"
    trap 'cleanup; "$ROOT/tests/servers/pg.sh" stop "$PG_DIR" >/dev/null 2>&1' EXIT
    PG_PORTS=()
    for n in $(seq 1 "$PG_REPLICAS"); do
        port=$(free_port)
        sed -e "s|^  sqlite: .*|  postgres: $PG_URL|" -e "s|^  listen: .*|  listen: 127.0.0.1:$port\n  replica: bench-$n|" \
            "$WORK/frontdesk.yaml" >"$WORK/frontdesk-pg-$n.yaml"
        FRONTDESK_LOG=warn "$FRONTDESK_BIN" run --config "$WORK/frontdesk-pg-$n.yaml" </dev/null >"$WORK/frontdesk-pg-$n.log" 2>&1 &
        PIDS+=($!)
        wait_port "$port"
        PG_PORTS+=("$port")
    done
    pg_rows() { psql -qtA "$PG_URL" -c 'select count(*) from messages'; }
    conns=$((CONNS / PG_REPLICAS))
    for port in "${PG_PORTS[@]}"; do
        wrk -t1 -c"$conns" -d2s -s "$BENCH_DIR/wrk_signed.lua" "http://127.0.0.1:$port/hooks/bench" -- "w$port" >/dev/null 2>&1 || true
    done
    before=$(pg_rows)
    WRK_PIDS=()
    for port in "${PG_PORTS[@]}"; do
        wrk -t1 -c"$conns" -d"${DURATION}s" --timeout 5s -s "$BENCH_DIR/wrk_signed.lua" \
            "http://127.0.0.1:$port/hooks/bench" -- "r$port" >"$WORK/pg-$port.log" 2>&1 &
        WRK_PIDS+=($!)
    done
    wait "${WRK_PIDS[@]}"
    after=$(pg_rows)
    PG_ROW=$(python3 - "$PG_REPLICAS" "$((after - before))" "$WORK" "${PG_PORTS[@]}" <<'EOF'
import json, sys
n, stored, work, ports = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
js = []
for p in ports:
    line = [l for l in open(f"{work}/pg-{p}.log") if l.startswith("WRKJSON ")][-1]
    js.append(json.loads(line.split(" ", 1)[1]))
req = sum(j["requests"] for j in js)
non2xx = sum(j["non2xx"] for j in js)
acked_rps = sum((j["requests"] - j["non2xx"]) / j["duration_s"] for j in js)
print("\t".join(str(x) for x in [f"pg-{n}-replicas", req, f"{acked_rps:.0f}", f'{max(j["p50_ms"] for j in js):.2f}',
      f'{max(j["p99_ms"] for j in js):.2f}', non2xx, sum(j["socket_errors"] for j in js),
      sum(j["timeouts"] for j in js), stored, "-", js[0]["body_bytes"]]))
EOF
)
    printf '%s\n' "$PG_ROW"
fi
python3 - "$NGINX_ROW" "$FD_ROW" "${PG_ROW:-}" <<'EOF'
import sys
n, f = (r.split("\t") for r in sys.argv[1:3])
print(f"ratio frontdesk/nginx acked req/s: {float(f[2]) / float(n[2]):.1%}")
if len(sys.argv) > 3 and sys.argv[3]:
    g = sys.argv[3].split("\t")
    print(f"ratio {g[0]} (PostgreSQL) / one replica on SQLite, acked req/s: {float(g[2]) / float(f[2]):.2f}x")
    if int(g[8]) < int(g[1]) - int(g[5]):
        print(f"WARNING: {g[0]}: fewer rows stored than 2xx answers")
if f[8] != "-" and int(f[8]) < int(f[1]) - int(f[5]):
    print("WARNING: fewer rows stored than 2xx answers")
EOF
# The group-commit writer's own view: deliveries per batch and commit time (summaries).
curl -s "http://127.0.0.1:$FD_PORT/metrics" | grep -E '^frontdesk_webhook_(batch_deliveries|commit_seconds)(\{quantile="0\.(5|99)"\}|_sum|_count)' | sed 's/^/# /' || true
