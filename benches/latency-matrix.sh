#!/usr/bin/env bash
# The latency matrix: apitree (release and production builds), nginx and HAProxy side by side
# in one run, on loopback, in front of the same upstream, at several connection counts; then
# what 10,000 idle keep-alive client connections cost each of them in memory.
#
# Every cell is wrk (WRK_THREADS, default 1) for SECONDS against one target; the targets take
# turns within each round and ROUNDS rounds are averaged, so a slow minute of the machine falls
# on all of them. Per cell: req/s, p50, p99, p99.9 (wrk's latency histogram, through a Lua
# `done` hook) and CPU per request (the serving processes' user+system time over the requests
# they served), each the median of the rounds, with the range of p99 over the rounds (on a
# 2-core machine where wrk, the upstream and the proxy share the cores, one round's p99 moves by
# 2x and more). Ratios are apitree's over nginx's and over HAProxy's, per cell.
#
# References, as Debian ships them and a new user would set them up:
#   nginx   worker_processes auto, proxy_pass to an upstream block with keepalive,
#           worker_connections raised for the idle-connection phase;
#   HAProxy 2.6, nbthread = cores, http-reuse always, maxconn raised likewise.
# apitree runs benches/proxy.yaml: API-key auth, key and org limits over all three windows,
# metrics and the access log (to a file), so it does more per request than either reference.
#
# Usage: benches/latency-matrix.sh [SECONDS per cell, default 4]
#   CONNS="8 32 128 512"   connection counts        ROUNDS=2   rounds
#   WRK_THREADS=1          wrk threads              IDLE=10000 idle connections (0: skip;
#                                                   capped by the open-files limit)
#   RELEASE_BIN / PRODUCTION_BIN   binaries built elsewhere (otherwise both are built here)
#   APITREE_WORKERS=N      passed to apitree (worker threads; default: the cores)
#   SCHED=1                also record the kernel's scheduling for 2 s of load at 32
#                          connections per target (perf sched, installed with apt when
#                          missing) and report the serving threads' wake-up delays and
#                          which CPUs they ran on (benches/sched-delay.py)
#   UNBOUND=1              also the release build with workerCpuAffinity: off (workers placed
#                          by the kernel), to see what binding each worker to a CPU changes
# Needs nginx, haproxy, wrk and python3 (the first three installed with apt when missing).
# Bounded: every load runs for SECONDS against 127.0.0.1 only; everything it starts is
# stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-4}"
CONNS="${CONNS:-8 32 128 512}"
ROUNDS="${ROUNDS:-2}"
WRK_THREADS="${WRK_THREADS:-1}"
IDLE="${IDLE:-10000}"
CORES="$(nproc)"
. benches/common.sh
need nginx nginx
need haproxy haproxy
need wrk wrk

if [ -z "${RELEASE_BIN:-}" ]; then
    cargo build --release --quiet --bin apitree
fi
if [ -z "${PRODUCTION_BIN:-}" ]; then
    cargo build --profile production --quiet --bin apitree
fi
RELEASE="${RELEASE_BIN:-$PWD/target/release/apitree}"
PRODUCTION="${PRODUCTION_BIN:-$PWD/target/production/apitree}"
bench_workdir
# Descriptors: the servers and the idle clients inherit the hard limit; a proxy holds two per
# connection at most (client and upstream), so the idle phase is capped to fit.
FDS="$(ulimit -Hn)"
[ "$FDS" = unlimited ] && FDS=1048576
ulimit -n "$FDS"
if [ $((IDLE * 2 + 2000)) -gt "$FDS" ]; then
    echo "the open-files limit ($FDS) allows $(((FDS - 2000) / 2)) idle connections, not $IDLE" >&2
    IDLE=$(((FDS - 2000) / 2))
fi

write_upstream_conf "$WORK/upstream.conf"
write_reference_conf "$WORK/nginx.conf" 'listen 127.0.0.1:18081;' 1024 $((IDLE + 1000)) \
    "worker_rlimit_nofile $FDS;"
cat >"$WORK/haproxy.cfg" <<HAPROXY
global
    nbthread $CORES
    maxconn $((IDLE + 500))
    pidfile $WORK/haproxy.pid
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    http-reuse always
frontend bench
    bind 127.0.0.1:18087
    default_backend upstream
backend upstream
    http-request replace-path /bench/(.*) /\1
    server up 127.0.0.1:18080
HAPROXY
nginx -c "$WORK/upstream.conf" -p "$WORK" -g 'daemon on;'
nginx -c "$WORK/nginx.conf" -p "$WORK" -g 'daemon on;'
setsid haproxy -f "$WORK/haproxy.cfg" -D
APITREE="$RELEASE" start_apitree 18082 19082
APITREE="$PRODUCTION" start_apitree 18083 19083
TARGETS="nginx:18081 haproxy:18087 apitree-release:18082 apitree-production:18083"
if [ -n "${UNBOUND:-}" ]; then
    write_apitree_conf "$WORK/proxy-unbound.yaml" "workerCpuAffinity: off"
    APITREE="$RELEASE" APITREE_CONFIG="$WORK/proxy-unbound.yaml" start_apitree 18084 19084
    TARGETS="$TARGETS apitree-unbound:18084"
fi
for _ in $(seq 50); do [ -s "$WORK/haproxy.pid" ] && break; sleep 0.1; done

for t in $TARGETS; do expect_200 "http://127.0.0.1:${t#*:}/bench/x"; done

# The processes serving a port: nginx's workers, HAProxy, or the apitree process.
serving_pids() {
    case $1 in
        18081) pgrep -P "$(cat "$WORK/ref.pid")" ;;
        18087) cat "$WORK/haproxy.pid" ;;
        *) cat "$WORK/apitree-$1.pid" ;;
    esac
}

# wrk prints the percentiles wrk's --latency leaves out (99.9%) through this hook.
cat >"$WORK/percentiles.lua" <<'LUA'
done = function(summary, latency, requests)
    io.write(string.format("PCT %d %d %d %d\n", latency:percentile(50), latency:percentile(99),
        latency:percentile(99.9), summary.requests))
end
LUA

# cell NAME PORT CONNS -> "NAME CONNS rps p50_ms p99_ms p999_ms cpu_us_per_request non2xx"
cell() {
    local before after out
    before=$(cpu_ticks "$2")
    out=$(wrk -t"$WRK_THREADS" -c"$3" -d"${DURATION}s" -s "$WORK/percentiles.lua" \
        -H "Authorization: Bearer $KEY" "http://127.0.0.1:$2/bench/x")
    after=$(cpu_ticks "$2")
    awk -v name="$1" -v conns="$3" -v t=$((after - before)) -v hz="$TICKS_PER_SEC" '
        /Requests\/sec/ { rps = $2 }
        /Non-2xx/ { bad = $5 }
        $1 == "PCT" { p50 = $2 / 1000; p99 = $3 / 1000; p999 = $4 / 1000; n = $5 }
        END { printf "%s %s %.0f %.3f %.3f %.3f %.1f %d\n", name, conns, rps, p50, p99, p999,
              t * 1e6 / hz / n, bad }' <<<"$out" | tee -a "$WORK/results" >&2
}

echo "warming up" >&2
for t in $TARGETS; do wrk -t1 -c8 -d2s -H "Authorization: Bearer $KEY" "http://127.0.0.1:${t#*:}/bench/x" >/dev/null; done
echo "measuring: $ROUNDS rounds x ${DURATION}s per cell, connections $CONNS, $WRK_THREADS wrk thread(s), $CORES cores" >&2
echo "name conns req/s p50_ms p99_ms p99.9_ms cpu_us/req non2xx" >&2
for r in $(seq "$ROUNDS"); do
    for c in $CONNS; do
        for t in $TARGETS; do cell "${t%%:*}" "${t#*:}" "$c"; done
    done
done

echo
echo "## Latency and throughput ($(date -u +%F), $CORES cores, wrk -t$WRK_THREADS, ${DURATION}s x $ROUNDS rounds per cell)"
python3 benches/latency-matrix-table.py "$WORK/results"

if [ -n "${SCHED:-}" ]; then
    need perf linux-perf
    echo
    echo "## Wake-up delays and placement, 32 connections, 2 s of perf sched per target"
    echo "| target | delay p50 ms | p99 ms | p99.9 ms | longest ms | serving threads: run time (share per CPU) |"
    echo "|---|---|---|---|---|---|"
    for t in $TARGETS; do
        wrk -t1 -c32 -d4s -H "Authorization: Bearer $KEY" "http://127.0.0.1:${t#*:}/bench/x" >/dev/null &
        load=$!
        sleep 1
        perf sched record -q -o "$WORK/sched.data" -- sleep 2 >/dev/null 2>&1
        wait "$load"
        perf sched timehist -i "$WORK/sched.data" 2>/dev/null |
            python3 benches/sched-delay.py "${t%%:*}" $(serving_pids "${t#*:}")
    done
fi

[ "$IDLE" -gt 0 ] || exit 0
# Memory with IDLE keep-alive client connections, each of which has made one request: the
# serving processes' resident memory before and with them open, per connection.
rss_kb() { local t=0; for p in $(serving_pids "$1"); do t=$((t + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status"))); done; echo "$t"; }
echo
echo "## Memory with $IDLE idle keep-alive connections"
echo "| target | RSS before MiB | RSS with them MiB | bytes per connection |"
echo "|---|---|---|---|"
for t in $TARGETS; do
    port=${t#*:}
    before=$(rss_kb "$port")
    python3 benches/idle-connections.py "$port" "$IDLE" "$KEY" >"$WORK/idle.out" 2>"$WORK/idle.err" &
    holder=$!
    for _ in $(seq 600); do grep -q '^holding' "$WORK/idle.out" 2>/dev/null && break; sleep 0.1; done
    grep -q '^holding' "$WORK/idle.out" || { echo "idle clients for ${t%%:*} did not connect:" >&2; cat "$WORK/idle.err" >&2; exit 1; }
    sleep 1
    with=$(rss_kb "$port")
    kill "$holder"; wait "$holder" 2>/dev/null || true
    awk -v n="${t%%:*}" -v b="$before" -v w="$with" -v c="$IDLE" \
        'BEGIN { printf "| %s | %.1f | %.1f | %.0f |\n", n, b / 1024, w / 1024, (w - b) * 1024 / c }'
    sleep 2
done
