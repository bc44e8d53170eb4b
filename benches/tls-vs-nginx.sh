#!/usr/bin/env bash
# apitree's TLS 1.3 termination vs nginx's, side by side in one run, on loopback.
#
# Both terminate TLS 1.3 with the same certificate (ECDSA P-256, made here with openssl) and
# proxy to the same upstream (nginx returning a small JSON body). apitree runs
# benches/proxy.yaml (auth, all limit windows, metrics, access log) with a `tls:` block; nginx
# is a plain reverse proxy (proxy_pass, upstream keepalive, worker_processes auto) with
# `ssl_protocols TLSv1.3`. Two loads, alternating between the two servers each round:
#   keep-alive  wrk over https (HTTP/1.1): req/s, p50, p99, and each server's CPU per request;
#   handshakes  `openssl s_time -new`, two clients at once: new TLS connections per second,
#               each a full handshake (s_time never resumes with -new), and each server's CPU
#               per handshake.
# Ratios are apitree/nginx (CPU and p99: lower is better).
#
# Usage: benches/tls-vs-nginx.sh [SECONDS per run, default 10] [CONNECTIONS, default 64]
# APITREE_BIN=PATH measures a binary built elsewhere (else the production build is made).
# Needs nginx, wrk and openssl (installed with apt when missing). Everything it starts listens
# on 127.0.0.1 only and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
CONNS="${2:-64}"
ROUNDS="${ROUNDS:-2}"

. benches/common.sh
need nginx nginx
need wrk wrk
need openssl openssl

if [ -z "${APITREE_BIN:-}" ]; then
    cargo build --profile production --quiet --bin apitree
fi
BIN="${APITREE_BIN:-$PWD/target/production/apitree}"
bench_workdir

# One certificate for both: ECDSA P-256, as cert-manager issues by default for ECDSA.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost \
    -keyout "$WORK/tls.key" -out "$WORK/tls.crt" 2>/dev/null

write_upstream_conf "$WORK/upstream.conf"
write_reference_conf "$WORK/reference.conf" "listen 127.0.0.1:18443 ssl;
        ssl_certificate $WORK/tls.crt;
        ssl_certificate_key $WORK/tls.key;
        ssl_protocols TLSv1.3;
        add_header Strict-Transport-Security \"max-age=31536000; includeSubDomains\" always;"
nginx -c "$WORK/upstream.conf" -p "$WORK" -g 'daemon on;'
nginx -c "$WORK/reference.conf" -p "$WORK" -g 'daemon on;'

write_apitree_conf "$WORK/proxy.yaml" $'tls:\n  certFile: tls.crt\n  keyFile: tls.key'
# In a session of its own, as daemonized nginx is (see benches/proxy-vs-nginx.sh: autogroup
# scheduling would otherwise share wrk's CPU share with it).
setsid "$BIN" --log-filter warn proxy --config "$WORK/proxy.yaml" --listen 127.0.0.1:18444 --admin 127.0.0.1:19444 \
    >"$WORK/apitree-access.log" 2>"$WORK/apitree.err" &
PIDS+=($!)
echo $! >"$WORK/apitree.pid"
for _ in $(seq 50); do curl -fs http://127.0.0.1:19444/readyz >/dev/null && break; sleep 0.1; done

trap 'cat "$WORK/apitree.err" >&2' ERR
for port in 18443 18444; do expect_200 "https://127.0.0.1:$port/bench/x" --tlsv1.3 --cacert "$WORK/tls.crt"; done
trap - ERR

serving_pids() {
    case $1 in
        18443) pgrep -P "$(cat "$WORK/ref.pid")" ;;
        *) cat "$WORK/apitree.pid" ;;
    esac
}
to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us$/, "", v); print v/1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v); print v+0 } else if (v ~ /s$/) { sub(/s$/, "", v); print v*1000 } else print v }'; }

# keepalive NAME PORT -> "ka NAME rps p50_ms p99_ms cpu_us_per_request" in $WORK/results
keepalive() {
    local out before after rps p50 p99 total cpu
    before=$(cpu_ticks "$2")
    out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -H "Authorization: Bearer $KEY" "https://127.0.0.1:$2/bench/x")
    after=$(cpu_ticks "$2")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    total=$(awk '/requests in/ {print $1}' <<<"$out")
    if grep -q "Non-2xx" <<<"$out"; then echo "$1: non-2xx answers:" >&2; echo "$out" >&2; exit 1; fi
    cpu=$(awk -v t=$((after - before)) -v hz="$TICKS_PER_SEC" -v n="$total" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
    echo "ka $1 $rps $(to_ms "$p50") $(to_ms "$p99") $cpu" >>"$WORK/results"
    printf '  keep-alive  %-8s %10s req/s  p50 %8s  p99 %8s  cpu/req %6s us\n' "$1" "$rps" "$p50" "$p99" "$cpu" >&2
}

# handshakes NAME PORT -> "hs NAME conns_per_s cpu_us_per_handshake" in $WORK/results
handshakes() {
    local before after n=0 c clients=()
    before=$(cpu_ticks "$2")
    for i in 1 2; do
        openssl s_time -connect "127.0.0.1:$2" -new -tls1_3 -time "$DURATION" >"$WORK/stime-$i" 2>&1 &
        clients+=($!)
    done
    wait "${clients[@]}" || true
    after=$(cpu_ticks "$2")
    for i in 1 2; do
        c=$(awk '/connections in [0-9.]+ real seconds/ {print $1; exit}' "$WORK/stime-$i")
        n=$((n + ${c:-0}))
    done
    [ "$n" -gt 0 ] || { echo "$1: no handshake completed:" >&2; cat "$WORK/stime-1" >&2; exit 1; }
    local rate cpu
    rate=$(awk -v n="$n" -v d="$DURATION" 'BEGIN { printf "%.0f", n / d }')
    cpu=$(awk -v t=$((after - before)) -v hz="$TICKS_PER_SEC" -v n="$n" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
    echo "hs $1 $rate $cpu" >>"$WORK/results"
    printf '  handshakes  %-8s %10s conn/s  cpu/handshake %6s us\n' "$1" "$rate" "$cpu" >&2
}

echo "warming up" >&2
for port in 18443 18444; do wrk -t1 -c8 -d2s -H "Authorization: Bearer $KEY" "https://127.0.0.1:$port/bench/x" >/dev/null; done
echo "measuring: ${ROUNDS} rounds x ${DURATION}s; keep-alive: ${CONNS} connections, 2 wrk threads; handshakes: 2 s_time clients" >&2
for _ in $(seq "$ROUNDS"); do
    keepalive nginx 18443
    keepalive apitree 18444
    handshakes nginx 18443
    handshakes apitree 18444
done

avg() { awk -v k="$1" -v n="$2" -v f="$3" '$1==k && $2==n { s+=$f; c++ } END { printf "%.3f", s/c }' "$WORK/results"; }
echo
printf '%-10s %12s %10s %10s %12s %12s %16s\n' target req/s p50_ms p99_ms cpu_us/req conn/s cpu_us/handshake
for n in nginx apitree; do
    printf '%-10s %12.0f %10s %10s %12s %12.0f %16s\n' "$n" "$(avg ka $n 3)" "$(avg ka $n 4)" "$(avg ka $n 5)" "$(avg ka $n 6)" "$(avg hs $n 3)" "$(avg hs $n 4)"
done
echo
awk -v ar="$(avg ka apitree 3)" -v nr="$(avg ka nginx 3)" -v ap="$(avg ka apitree 5)" -v np="$(avg ka nginx 5)" \
    -v ac="$(avg ka apitree 6)" -v nc="$(avg ka nginx 6)" -v ah="$(avg hs apitree 3)" -v nh="$(avg hs nginx 3)" \
    -v ahc="$(avg hs apitree 4)" -v nhc="$(avg hs nginx 4)" 'BEGIN {
    printf "apitree/nginx keep-alive req/s      %.2fx\n", ar/nr
    printf "apitree/nginx keep-alive p99        %.2fx (lower is better)\n", ap/np
    printf "apitree/nginx CPU per request       %.2fx (lower is better)\n", ac/nc
    printf "apitree/nginx new connections/s     %.2fx\n", ah/nh
    printf "apitree/nginx CPU per handshake     %.2fx (lower is better)\n", ahc/nhc
}'
