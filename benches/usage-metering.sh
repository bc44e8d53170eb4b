#!/usr/bin/env bash
# What usage metering costs, side by side in one run: two database-mode gateways on the same
# database, config, key, API and upstream (nginx returning a small JSON body), one metering
# usage (the default) and one with --no-usage-metering, driven by wrk in alternating rounds.
# Prints req/s and p99 of each, the metered/unmetered ratios, and the calls the metered one
# recorded in usage_counters (they must match what wrk sent it).
#
# Usage: benches/usage-metering.sh [SECONDS per run, default 8] [CONNECTIONS, default 32]
#   ROUNDS=3 (alternations), APITREE_BIN=PATH (a built binary; default: the production build),
#   APITREE_TEST_PG (server URL without a database; default postgres://postgres@127.0.0.1:5432).
# Needs nginx and wrk (installed with apt when missing) and a PostgreSQL server. Bounded: every
# load runs for SECONDS against 127.0.0.1 only; everything started (and its database) is
# removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
DURATION="${1:-8}"
CONNS="${2:-32}"
ROUNDS="${ROUNDS:-3}"
PG="${APITREE_TEST_PG:-postgres://postgres@127.0.0.1:5432}"
DB="apitree_bench_usage_$$"

need nginx nginx
need wrk wrk
need psql postgresql-client

if [ -z "${APITREE_BIN:-}" ]; then
    cargo build --profile production --quiet --bin apitree
fi
BIN="${APITREE_BIN:-$PWD/target/production/apitree}"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$WORK/up.pid" ] && kill "$(cat "$WORK/up.pid")" 2>/dev/null || true
    wait 2>/dev/null || true
    psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

write_upstream_conf "$WORK/upstream.conf" 18190
nginx -c "$WORK/upstream.conf" -p "$WORK"

psql "$PG/postgres" -qc "CREATE DATABASE $DB" >/dev/null
URL="$PG/$DB"
"$BIN" migrate --database-url "$URL" --log-filter warn
ORG="$("$BIN" orgs create bench --database-url "$URL" --log-filter warn)"
psql "$URL" -qc "INSERT INTO apis (id, org_id, name, path_prefix, upstream_url)
                 VALUES (gen_random_uuid(), '$ORG', 'bench', '/bench/', 'http://127.0.0.1:18190/')" >/dev/null
cp benches/bench.example-pepper "$WORK/pepper"
cat > "$WORK/proxy.yaml" <<YAML
secrets:
  pepperFile: pepper
tiers:
  - name: unlimited-ish
    perKey: { burst10s: 1000000000, perMinute: 6000000000, perDay: 8640000000000 }
    perOrg: { burst10s: 1000000000, perMinute: 6000000000, perDay: 8640000000000 }
defaultTier: unlimited-ish
routes: []
YAML
KEY="$("$BIN" keys create --org "$ORG" --scope live --config "$WORK/proxy.yaml" --database-url "$URL" --log-filter warn)"

start() { # start NAME PORT ADMIN_PORT EXTRA...
    local name="$1" port="$2" admin="$3"; shift 3
    "$BIN" proxy --config "$WORK/proxy.yaml" --database-url "$URL" --upstream-allow 127.0.0.0/8 \
        --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" --no-access-log --log-filter warn "$@" \
        >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 1 100); do
        curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "$name did not become ready:" >&2; cat "$WORK/$name.log" >&2; exit 1
}
start metered 18191 18291
start unmetered 18192 18292 --no-usage-metering

# wrk's summary as "REQS_PER_SEC P99_MS REQUESTS".
measure() {
    local out rps p99 n
    out="$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H "Authorization: Bearer $KEY" \
        "http://127.0.0.1:$1/bench/x")"
    rps="$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")"
    p99="$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v=v*1000}; print v}' <<<"$out")"
    n="$(awk '/requests in/ {print $1}' <<<"$out")"
    echo "$rps $p99 $n"
}
# Warm both (connections, JIT-free but caches and pools).
wrk -t1 -c"$CONNS" -d2s -H "Authorization: Bearer $KEY" http://127.0.0.1:18191/bench/x >/dev/null
wrk -t1 -c"$CONNS" -d2s -H "Authorization: Bearer $KEY" http://127.0.0.1:18192/bench/x >/dev/null
sleep 11 # the warm-up's usage flushes before counting starts
before="$(psql "$URL" -Atc "SELECT coalesce(sum(requests), 0) FROM usage_counters")"

declare -A RPS P99
sent=0
for r in $(seq 1 "$ROUNDS"); do
    for t in metered unmetered; do
        port=18191; [ "$t" = unmetered ] && port=18192
        read -r rps p99 n < <(measure "$port")
        RPS[$t]="${RPS[$t]:-} $rps"; P99[$t]="${P99[$t]:-} $p99"
        [ "$t" = metered ] && sent=$((sent + n))
        printf 'round %d %-10s %10.0f req/s  p99 %7.2f ms\n' "$r" "$t" "$rps" "$p99"
    done
done
# Medians: one disturbed round (the first often is) moves a mean far more than the effect.
median() { tr ' ' '\n' <<<"$1" | awk 'NF' | sort -g | awk '{v[NR]=$1} END {if (NR % 2) printf "%.2f", v[(NR+1)/2]; else printf "%.2f", (v[NR/2]+v[NR/2+1])/2}'; }
m_rps="$(median "${RPS[metered]}")"; u_rps="$(median "${RPS[unmetered]}")"
m_p99="$(median "${P99[metered]}")"; u_p99="$(median "${P99[unmetered]}")"
echo
printf '%-10s %10s %10s   (medians of %d rounds)\n' "" "req/s" "p99 ms" "$ROUNDS"
printf '%-10s %10.0f %10.2f\n' metered "$m_rps" "$m_p99" unmetered "$u_rps" "$u_p99"
awk -v a="$m_rps" -v b="$u_rps" -v c="$m_p99" -v d="$u_p99" \
    'BEGIN {printf "metered/unmetered: req/s %.3f, p99 %.3f\n", a/b, c/d}'
sleep 11 # the last flush
after="$(psql "$URL" -Atc "SELECT coalesce(sum(requests), 0) FROM usage_counters")"
echo "usage recorded by the metered gateway: $((after - before)) calls (wrk counted $sent completed)"
