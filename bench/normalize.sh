#!/bin/sh
# email::normalize over the 10,000-message bench mailbox (bench/lib/gen_mail.py, seed 42, ~166 MB):
# the full parse (normalize_unoptimized) against the lean path that skips decoding base64
# attachments (normalize), alternating in one process; prints CPU seconds and MB/s of each.
#   bench/normalize.sh [MAILDIR]    (generated on the first run, then reused)
# Builds with the release profile; CARGO_PROFILE_RELEASE_LTO=false shortens the build by minutes
# (both paths are in the same binary, so the comparison stays fair).
set -eu
cd "$(dirname "$0")/.."
dir=${1:-${TMPDIR:-/tmp}/frontdesk-normalize-bench}
if [ ! -d "$dir/cur" ]; then
    python3 bench/lib/gen_mail.py "$dir" --count 10000 --seed 42
fi
cargo build --release --quiet --example normalize_bench
bin=$(cargo build --release --example normalize_bench --message-format=json 2>/dev/null |
    /usr/bin/python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' | tail -1)
echo "maildir: $dir; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
"$bin" "$dir"
