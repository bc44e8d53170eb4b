#!/usr/bin/env bash
# Instructions per proxied request: apitree against a baseline apitree build, side by side in
# one run, counted by valgrind's callgrind (instructions, not seconds: the same binary and
# input give the same count whatever else the machine is doing, so a 1% change is visible
# where wall-clock benchmarks on a shared 2-core machine wander by 5%).
#
# Each binary serves benches/proxy.yaml (auth + every limit window + metrics + access log) with
# one worker thread, under callgrind, to one keep-alive client that sends N1 requests; then
# again with N2. (count(N2) - count(N1)) / (N2 - N1) is the cost of one request with start-up
# and shutdown cancelled out. The upstream is nginx returning a small JSON body.
#
#   git worktree add /tmp/base OLD && (cd /tmp/base && cargo build --profile production --bin apitree)
#   BASELINE_BIN=/tmp/base/target/production/apitree benches/cpu-per-request.sh
#
# Environment: APITREE_BIN (default target/production/apitree, built when missing),
# BASELINE_BIN (required), N1 (default 500), N2 (default 2500).
# Needs valgrind, nginx and python3 (valgrind and nginx installed with apt when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
N1="${N1:-500}"
N2="${N2:-2500}"
BASELINE_BIN="${BASELINE_BIN:?set BASELINE_BIN to the apitree binary to compare with}"

need valgrind valgrind
need nginx nginx
if [ -z "${APITREE_BIN:-}" ]; then
    cargo build --profile production --quiet --bin apitree
fi
BIN="${APITREE_BIN:-$PWD/target/production/apitree}"
WORK="$(mktemp -d)"
cleanup() {
    [ -f "$WORK/up.pid" ] && kill "$(cat "$WORK/up.pid")" 2>/dev/null || true
    [ -n "${SERVER:-}" ] && kill "$SERVER" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

write_upstream_conf "$WORK/upstream.conf"
nginx -c "$WORK/upstream.conf" -p "$WORK" -g 'daemon on;'

# One keep-alive connection, N requests, each answered 200 with its whole body read.
cat > "$WORK/client.py" <<'PY'
import re, socket, sys, time
port, n, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
deadline = time.time() + 120
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port))
        break
    except OSError:
        if time.time() > deadline:
            sys.exit(f"nothing listens on 127.0.0.1:{port}")
        time.sleep(0.2)
req = f"GET /bench/x HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
buf = b""
for i in range(n):
    s.sendall(req)
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(f"connection closed after {i} responses")
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    if head.split(b" ", 2)[1] != b"200":
        sys.exit(f"request {i}: {head.decode(errors='replace')}")
    length = int(re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head).group(1))
    while len(buf) < length:
        buf += s.recv(65536)
    buf = buf[length:]
s.close()
PY

# count BIN N: instructions callgrind counted for the whole run of BIN serving N requests.
count() {
    local bin=$1 n=$2 out="$WORK/callgrind.$RANDOM"
    APITREE_WORKERS=1 setsid valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$bin" --log-filter warn proxy --config benches/proxy.yaml --listen 127.0.0.1:18090 \
        --admin 127.0.0.1:19090 >/dev/null 2>"$WORK/server.err" &
    SERVER=$!
    python3 "$WORK/client.py" 18090 "$n" "$KEY" || { cat "$WORK/server.err" >&2; exit 1; }
    kill -TERM "$SERVER"
    wait "$SERVER" || true
    SERVER=
    awk '/^(summary|totals):/ {print $2; exit}' "$out"
}

printf '%-10s %14s %14s %12s\n' binary "I($N1)" "I($N2)" "instr/req"
declare -A PER
for name in apitree baseline; do
    bin=$BIN
    [ "$name" = baseline ] && bin=$BASELINE_BIN
    a=$(count "$bin" "$N1")
    b=$(count "$bin" "$N2")
    PER[$name]=$(( (b - a) / (N2 - N1) ))
    printf '%-10s %14s %14s %12s\n' "$name" "$a" "$b" "${PER[$name]}"
done
awk -v a="${PER[apitree]}" -v b="${PER[baseline]}" \
    'BEGIN { printf "apitree/baseline instructions per request: %.3f (%+.1f%%)\n", a / b, (a / b - 1) * 100 }'
