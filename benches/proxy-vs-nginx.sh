#!/usr/bin/env bash
# apitree vs nginx, side by side in one run, on loopback.
#
# Starts an upstream (nginx returning a small JSON body), nginx as a reverse proxy in front of
# it (proxy_pass, upstream keepalive, worker_processes auto) and apitree (benches/proxy.yaml:
# auth + all limit windows + metrics + access log; PII off), then drives each with wrk in
# alternation and prints req/s, p50, p99 and the apitree/nginx ratios; then the same with
# rate-limit counters shared through Redis; then `apitree pii scan --mask` throughput.
# Two more targets come from examples/bare_proxy.rs, apitree's hyper server and worker model with
# no policy at all: `bare-hyper` calls upstreams through hyper-util's pooled client,
# `bare-workerpool` through apitree's own per-worker pool (apitree's transport without the
# policies). They show how much of the gap to nginx is hyper's own, and compare the two pools.
#
# BASELINE_BIN=PATH adds `baseline`: another apitree binary (say, the previous commit's
# production build) on the same config, measured in the same rounds, with apitree/baseline
# ratios — how a change moved the cost per request:
#   git worktree add /tmp/base HEAD~1 && (cd /tmp/base && cargo build --profile production --bin apitree)
#   BASELINE_BIN=/tmp/base/target/production/apitree benches/proxy-vs-nginx.sh
#
# Usage: benches/proxy-vs-nginx.sh [SECONDS per run, default 10] [CONNECTIONS, default 64]
# Needs nginx, wrk and redis-server (installed with apt when missing). Bounded: every load
# runs for SECONDS against 127.0.0.1 only, and everything started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
CONNS="${2:-64}"
ROUNDS="${ROUNDS:-2}"
. benches/common.sh
need nginx nginx
need wrk wrk
need redis-server redis-server

# APITREE_BIN and BARE_BIN: measure binaries built elsewhere (no build here).
if [ -z "${APITREE_BIN:-}" ] || [ -z "${BARE_BIN:-}" ]; then
    cargo build --profile production --quiet --bin apitree --example bare-proxy
fi
BIN="${APITREE_BIN:-$PWD/target/production/apitree}"
BARE="${BARE_BIN:-$PWD/target/production/examples/bare-proxy}"
bench_workdir
write_upstream_conf "$WORK/upstream.conf"
write_reference_conf "$WORK/reference.conf" 'listen 127.0.0.1:18081;'
nginx -c "$WORK/upstream.conf" -p "$WORK" -g 'daemon on;'
nginx -c "$WORK/reference.conf" -p "$WORK" -g 'daemon on;'

start_apitree 18082 19082
redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 || redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
# Redis database 15, emptied first: each run starts from fresh counters (the day window's
# would otherwise carry over from the last run).
redis-cli -h 127.0.0.1 -n 15 flushdb >/dev/null
start_apitree 18083 19083 --redis-url redis://127.0.0.1:6379/15
BASELINE_BIN="${BASELINE_BIN:-}"
PORTS="18081 18082 18083 18084 18085"
if [ -n "$BASELINE_BIN" ]; then
    APITREE="$BASELINE_BIN" start_apitree 18086 19086
    PORTS="$PORTS 18086"
fi
setsid "$BARE" 127.0.0.1:18084 127.0.0.1:18080 /bench/ 2>"$WORK/bare.err" &
PIDS+=($!)
echo $! >"$WORK/bare-18084.pid"
BARE_POOL=worker setsid "$BARE" 127.0.0.1:18085 127.0.0.1:18080 /bench/ 2>"$WORK/bare-workerpool.err" &
PIDS+=($!)
echo $! >"$WORK/bare-18085.pid"
for port in 18084 18085; do
    for _ in $(seq 50); do curl -fs -o /dev/null "http://127.0.0.1:$port/bench/x" && break; sleep 0.1; done
done

# Sanity: each path answers 200 before we measure.
for port in $PORTS; do expect_200 "http://127.0.0.1:$port/bench/x"; done

# The processes serving a port: nginx's workers, or the apitree process.
serving_pids() {
    case $1 in
        18081) pgrep -P "$(cat "$WORK/ref.pid")" ;;
        18084 | 18085) cat "$WORK/bare-$1.pid" ;;
        *) cat "$WORK/apitree-$1.pid" ;;
    esac
}
# run NAME PORT -> appends "NAME rps p50_ms p99_ms non2xx cpu_us_per_request" to $WORK/results.
# CPU per request is the proxy's own user+system time over the requests it served: a steadier
# efficiency figure than req/s, which also depends on how wrk and the upstream share the cores.
run() {
    local out before after
    before=$(cpu_ticks "$2")
    out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -H "Authorization: Bearer $KEY" "http://127.0.0.1:$2/bench/x")
    after=$(cpu_ticks "$2")
    local rps p50 p99 errors total cpu
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    errors=$(awk '/Non-2xx/ {print $5}' <<<"$out")
    total=$(awk '/requests in/ {print $1}' <<<"$out")
    cpu=$(awk -v t=$((after - before)) -v hz="$TICKS_PER_SEC" -v n="$total" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
    echo "$1 $rps $(to_ms "$p50") $(to_ms "$p99") ${errors:-0} $cpu" >>"$WORK/results"
    printf '  %-16s %10s req/s  p50 %8s  p99 %8s  cpu/req %6s us  non-2xx %s\n' "$1" "$rps" "$p50" "$p99" "$cpu" "${errors:-0}" >&2
}
to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us$/, "", v); print v/1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v); print v+0 } else if (v ~ /s$/) { sub(/s$/, "", v); print v*1000 } else print v }'; }

echo "warming up" >&2
for port in $PORTS; do wrk -t1 -c8 -d2s -H "Authorization: Bearer $KEY" "http://127.0.0.1:$port/bench/x" >/dev/null; done
echo "measuring: ${ROUNDS} rounds x ${DURATION}s, ${CONNS} connections, 2 wrk threads" >&2
for r in $(seq "$ROUNDS"); do
    run nginx 18081
    run apitree 18082
    run apitree-redis 18083
    run bare-hyper 18084
    run bare-workerpool 18085
    [ -z "$BASELINE_BIN" ] || run baseline 18086
done

summarize() { awk -v n="$1" '$1==n { rps+=$2; p50+=$3; p99+=$4; cpu+=$6; c++ } END { printf "%.0f %.3f %.3f %.1f", rps/c, p50/c, p99/c, cpu/c }' "$WORK/results"; }
read -r n_rps n_p50 n_p99 n_cpu <<<"$(summarize nginx)"
read -r a_rps a_p50 a_p99 a_cpu <<<"$(summarize apitree)"
read -r r_rps r_p50 r_p99 r_cpu <<<"$(summarize apitree-redis)"
read -r b_rps b_p50 b_p99 b_cpu <<<"$(summarize bare-hyper)"
read -r q_rps q_p50 q_p99 q_cpu <<<"$(summarize bare-workerpool)"
# How often the Redis-shared replica went to Redis (leases cover the rest).
metric() { curl -fs "http://127.0.0.1:19083/metrics" | awk -v m="$1" '$1 ~ "^"m {s+=$2} END {printf "%.0f", s}'; }
redis_calls=$(metric apitree_proxy_ratelimit_store_calls_total)
redis_requests=$(metric apitree_proxy_requests_total)

# PII masking throughput on one core: ~256 MB of JSON lines, 1 in 4 carrying PII.
python3 - "$WORK/pii.txt" <<'PY'
import sys
line_pii = '{"id":%d,"name":"홍길동","rrn":"900101-1234568","tel":"010-1234-5678","note":"계좌 110-123-456789"}\n'
line_plain = '{"id":%d,"sku":"A-1234","qty":3,"price":12900,"ts":"2026-11-29T07:00:00Z","status":"shipped"}\n'
with open(sys.argv[1], "w") as f:
    size, i = 0, 0
    while size < 256 * 1024 * 1024:
        s = (line_pii if i % 4 == 0 else line_plain) % i
        f.write(s); size += len(s.encode()); i += 1
PY
bytes=$(stat -c %s "$WORK/pii.txt")
start=$(date +%s.%N)
taskset -c 0 "$BIN" pii scan --mask <"$WORK/pii.txt" >/dev/null 2>"$WORK/pii.err"
end=$(date +%s.%N)
pii_mbs=$(awk -v b="$bytes" -v s="$start" -v e="$end" 'BEGIN { printf "%.0f", b/1e6/(e-s) }')

echo
printf '%-16s %12s %10s %10s %12s\n' target req/s p50_ms p99_ms cpu_us/req
printf '%-16s %12s %10s %10s %12s\n' nginx "$n_rps" "$n_p50" "$n_p99" "$n_cpu"
printf '%-16s %12s %10s %10s %12s\n' apitree "$a_rps" "$a_p50" "$a_p99" "$a_cpu"
printf '%-16s %12s %10s %10s %12s\n' apitree-redis "$r_rps" "$r_p50" "$r_p99" "$r_cpu"
printf '%-16s %12s %10s %10s %12s\n' bare-hyper "$b_rps" "$b_p50" "$b_p99" "$b_cpu"
printf '%-16s %12s %10s %10s %12s\n' bare-workerpool "$q_rps" "$q_p50" "$q_p99" "$q_cpu"
echo
awk -v a="$a_rps" -v n="$n_rps" -v r="$r_rps" -v ap="$a_p99" -v np="$n_p99" -v rp="$r_p99" \
    -v ac="$a_cpu" -v nc="$n_cpu" -v rc="$r_cpu" -v b="$b_rps" -v bc="$b_cpu" -v q="$q_rps" -v qc="$q_cpu" -v calls="$redis_calls" -v reqs="$redis_requests" 'BEGIN {
    printf "apitree/nginx req/s        %.2fx\n", a/n
    printf "apitree/nginx p99          %.2fx (lower is better)\n", ap/np
    printf "apitree/nginx CPU/request  %.2fx (lower is better)\n", ac/nc
    printf "apitree-redis/nginx req/s  %.2fx\n", r/n
    printf "apitree-redis/nginx p99    %.2fx\n", rp/np
    printf "apitree-redis/nginx CPU/req %.2fx\n", rc/nc
    printf "bare-hyper/nginx req/s     %.2fx (no policies: the floor hyper sets)\n", b/n
    printf "bare-hyper/nginx CPU/req   %.2fx\n", bc/nc
    printf "apitree/bare-workerpool req/s       %.2fx (what the policies cost)\n", a/q
    printf "bare-workerpool/bare-hyper req/s    %.2fx (apitree pool vs hyper-util pool)\n", q/b
    printf "bare-workerpool/bare-hyper CPU/req  %.2fx (lower is better)\n", qc/bc
    printf "Redis round trips          %d for %d requests\n", calls, reqs
}'
echo "pii scan --mask (one core)  ${pii_mbs} MB/s over $((bytes / 1000000)) MB"
# Each round's own ratios (apitree against the nginx run just before it): p99 on a shared
# 2-core machine moves by +-20% from one 10 s run to the next, so the spread says how far
# the averaged ratios above can be trusted.
awk '$1=="nginx" { n++; nr[n]=$2; np[n]=$4 } $1=="apitree" { a++; ar[a]=$2; ap[a]=$4 }
    END {
        printf "per round, apitree/nginx:  req/s"; for (i = 1; i <= a; i++) printf " %.2fx", ar[i]/nr[i]
        printf ";  p99"; for (i = 1; i <= a; i++) { printf " %.2fx", ap[i]/np[i]; if (ap[i] <= np[i]) le++ }
        printf "\napitree p99 <= nginx p99 in %d of %d rounds\n", le, a
    }' "$WORK/results"
if [ -n "$BASELINE_BIN" ]; then
    read -r l_rps l_p50 l_p99 l_cpu <<<"$(summarize baseline)"
    printf '%-16s %12s %10s %10s %12s\n' baseline "$l_rps" "$l_p50" "$l_p99" "$l_cpu"
    awk -v a="$a_rps" -v l="$l_rps" -v ap="$a_p99" -v lp="$l_p99" -v ac="$a_cpu" -v lc="$l_cpu" 'BEGIN {
        printf "apitree/baseline req/s       %.3fx\n", a/l
        printf "apitree/baseline p99         %.3fx (lower is better)\n", ap/lp
        printf "apitree/baseline CPU/request %.3fx (lower is better)\n", ac/lc
    }'
    awk '$1=="baseline" { b++; bc[b]=$6 } $1=="apitree" { a++; ac[a]=$6 }
        END { printf "per round, apitree/baseline CPU/request:"; for (i = 1; i <= a; i++) printf " %.3fx", ac[i]/bc[i]; printf "\n" }' "$WORK/results"
fi
