# Shared by the proxy benchmarks (sourced, not run): the benchmark key, installing a missing
# tool, a work directory that is cleaned up with everything started in it, the upstream they
# all call, starting apitree, and the CPU time of the processes serving a port.

KEY="at_live_vLb1N8gfg8Hywq5YOC79ImjUvm015Z0cyT1b"
TICKS_PER_SEC=$(getconf CLK_TCK)
PIDS=()

need() { command -v "$1" >/dev/null || { echo "installing $2" >&2; apt-get install -y -qq --no-install-recommends "$2" >/dev/null; }; }

# WORK: a temporary directory; on exit every process in PIDS and every daemon that left a
# *.pid file in WORK is stopped, and WORK is removed.
bench_workdir() {
    WORK="$(mktemp -d)"
    trap bench_cleanup EXIT
}
bench_cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for f in "$WORK"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}

# The upstream: one nginx worker answering a small JSON body on 127.0.0.1:PORT (18080).
write_upstream_conf() { # write_upstream_conf FILE [PORT]
    cat >"$1" <<NGINX
worker_processes 1;
pid $WORK/up.pid;
error_log $WORK/up-error.log;
events { worker_connections 4096; }
http {
    access_log off;
    server {
        listen 127.0.0.1:${2:-18080} reuseport;
        keepalive_requests 1000000;
        location / { default_type application/json; return 200 '{"ok":true,"service":"bench-upstream"}'; }
    }
}
NGINX
}

# The reference: nginx as a reverse proxy to the upstream (worker_processes auto, upstream
# keepalive, access log on) serving /bench/; SERVER is the server block's own lines (listen,
# TLS), MAIN extra main-context lines.
write_reference_conf() { # write_reference_conf FILE SERVER [KEEPALIVE=128] [WORKER_CONNECTIONS=4096] [MAIN]
    cat >"$1" <<NGINX
worker_processes auto;
pid $WORK/ref.pid;
error_log $WORK/ref-error.log;
${5:-}
events { worker_connections ${4:-4096}; }
http {
    access_log $WORK/ref-access.log;
    upstream bench { server 127.0.0.1:18080; keepalive ${3:-128}; }
    server {
        $2
        keepalive_requests 1000000;
        location /bench/ {
            proxy_pass http://bench/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
NGINX
}

# Each server under test runs in a session of its own, as daemonized nginx does: with the
# kernel's autogroup scheduling (sched_autogroup_enabled=1, common on desktops and VMs) a
# process sharing wrk's session also shares wrk's CPU share when the cores are oversubscribed,
# which handicapped apitree and the bare proxies against nginx by 10-20% req/s.
start_apitree() { # start_apitree PORT ADMINPORT [extra args]; the binary is $APITREE (default $BIN),
    # the config $APITREE_CONFIG (default benches/proxy.yaml)
    local port=$1 admin=$2; shift 2
    setsid "${APITREE:-$BIN}" --log-filter warn proxy --config "${APITREE_CONFIG:-benches/proxy.yaml}" --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" "$@" \
        >"$WORK/apitree-$port-access.log" 2>"$WORK/apitree-$port.err" &
    PIDS+=($!)
    echo $! >"$WORK/apitree-$port.pid"
    for _ in $(seq 50); do curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null && return 0; sleep 0.1; done
    echo "apitree on $port did not start:" >&2; cat "$WORK/apitree-$port.err" >&2; exit 1
}

# write_apitree_conf FILE [YAML]: benches/proxy.yaml with YAML lines added, in FILE's directory
# with its pepper file (relative paths in the config resolve there).
write_apitree_conf() {
    cp benches/bench.example-pepper "$(dirname "$1")/"
    { cat benches/proxy.yaml; [ -z "${2:-}" ] || printf '%s\n' "$2"; } >"$1"
}

# expect_200 URL [CURL ARGS]: the benchmark key's request to URL answers 200; fails (stopping a
# set -e script) otherwise.
expect_200() {
    local url=$1 code
    shift
    code=$(curl -s -o /dev/null -w '%{http_code}' "$@" -H "Authorization: Bearer $KEY" "$url") || true
    [ "$code" = 200 ] || { echo "$url answered $code, not 200" >&2; return 1; }
}

# CPU time (clock ticks, user + system) the processes serving a port have used; the sourcing
# script defines serving_pids PORT.
cpu_ticks() { local t=0; for p in $(serving_pids "$1"); do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
