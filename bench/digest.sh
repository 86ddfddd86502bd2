#!/bin/sh
# Build and render one digest over a store with 100,000 messages and 10,000 open conversations;
# prints the median of 7 runs. Target: under 300 ms.
#   bench/digest.sh [DB_PATH]     (the store is created and filled on the first run, then reused)
set -eu
cd "$(dirname "$0")/.."
db=${1:-${TMPDIR:-/tmp}/frontdesk-digest-bench.db}
cargo build --release --quiet --example digest_bench
bin=$(cargo build --release --example digest_bench --message-format=json 2>/dev/null |
    /usr/bin/python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' | tail -1)
echo "store: $db"
"$bin" "$db"
