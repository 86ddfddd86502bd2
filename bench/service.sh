#!/usr/bin/env bash
# Service footprint: time from exec to READY=1 and idle RSS 10 s after start, with two IMAP
# sources (the test rig's Dovecot, over TLS), one webhook source and one channel configured.
# Targets (issue 7): READY under 200 ms, idle RSS under 20 MB. Needs root (the rig's Dovecot).
#   bench/service.sh [RUNS]     (default 5; prints the median and the spread)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs=${1:-5}

cargo build --release --locked >&2
bin=target/release/frontdesk
eval "$(tests/servers/rig.sh start --owner $$)"
work=$(mktemp -d)
trap 'tests/servers/rig.sh stop "$RIG_DIR" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
printf 'secret\n' > "$work/imap.pw"; chmod 600 "$work/imap.pw"
printf 'bench-token\n' > "$work/hook.secret"; chmod 600 "$work/hook.secret"
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/frontdesk.yaml" <<YAML
storage: { sqlite: $work/frontdesk.db }
server: { listen: "127.0.0.1:$port" }
team: [{ name: Ann, email: [ann@example.com] }]
sources:
  - name: alice-mail
    imap: { host: 127.0.0.1, port: $RIG_IMAPS_PORT, ca_file: $RIG_CA, username: alice, password_file: $work/imap.pw }
  - name: bob-mail
    imap: { host: 127.0.0.1, port: $RIG_IMAPS_PORT, ca_file: $RIG_CA, username: bob, password_file: $work/imap.pw }
  - name: form
    webhook: { preset: form, auth: { scheme: bearer, secret_file: $work/hook.secret } }
channels:
  - name: out
    email: { file: $work/outbox, from: "fd@example.com", to: [ann@example.com] }
YAML
"$bin" check "$work/frontdesk.yaml" >&2

/usr/bin/python3 - "$bin" "$work" "$runs" <<'PY'
import os, socket, statistics, subprocess, sys, time
binary, work, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
ready_ms, rss_kb = [], []
for i in range(runs):
    path = os.path.join(work, f"notify{i}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); sock.bind(path); sock.settimeout(10)
    env = dict(os.environ, NOTIFY_SOCKET=path, FRONTDESK_LOG="warn")
    t0 = time.monotonic()
    p = subprocess.Popen([binary, "run", "--config", os.path.join(work, "frontdesk.yaml")], env=env,
                         stderr=subprocess.DEVNULL)
    while True:
        if b"READY=1" in sock.recv(4096):
            ready_ms.append((time.monotonic() - t0) * 1000); break
    time.sleep(10)
    with open(f"/proc/{p.pid}/status") as f:
        rss_kb.append(next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")))
    p.terminate(); p.wait(timeout=30); sock.close()
med = statistics.median
print("| measure | median | min | max | target |")
print("|---|---|---|---|---|")
print(f"| exec -> READY=1 | {med(ready_ms):.0f} ms | {min(ready_ms):.0f} ms | {max(ready_ms):.0f} ms | < 200 ms |")
print(f"| idle RSS at 10 s | {med(rss_kb)/1024:.1f} MiB | {min(rss_kb)/1024:.1f} MiB | {max(rss_kb)/1024:.1f} MiB | < 20 MB |")
print(f"(runs: {runs}; two IMAP sources over TLS to the rig's Dovecot, one webhook source, one file channel)")
PY
