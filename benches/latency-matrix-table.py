"""The tables of benches/latency-matrix.sh from its raw results.

    python3 benches/latency-matrix-table.py RESULTS

RESULTS has one line per cell and round: name conns req/s p50_ms p99_ms p99.9_ms cpu_us non2xx.
Prints, per connection count and target, the median of the rounds (and p99's range), then
apitree's ratios to nginx and HAProxy per cell and whether the goal is met (p99 <= nginx's,
p99 <= 1.2x HAProxy's, req/s >= nginx's).
"""

import statistics
import sys
from collections import defaultdict

TARGETS = ["nginx", "haproxy", "apitree-release", "apitree-production", "apitree-unbound"]
cells = defaultdict(list)
order = []
with open(sys.argv[1]) as f:
    for line in f:
        name, conns, *values = line.split()
        if conns not in order:
            order.append(conns)
        cells[(name, conns)].append([float(v) for v in values])


def median(name, conns, i):
    return statistics.median(r[i] for r in cells[(name, conns)])


print("| conns | target | req/s | p50 ms | p99 ms (range) | p99.9 ms | CPU us/req | non-2xx |")
print("|---|---|---|---|---|---|---|---|")
for conns in order:
    for name in TARGETS:
        rows = cells[(name, conns)]
        if not rows:
            continue
        p99s = [r[2] for r in rows]
        print(
            f"| {conns} | {name} | {median(name, conns, 0):.0f} | {median(name, conns, 1):.2f} "
            f"| {median(name, conns, 2):.2f} ({min(p99s):.2f}–{max(p99s):.2f}) "
            f"| {median(name, conns, 3):.2f} | {median(name, conns, 4):.1f} "
            f"| {sum(r[5] for r in rows):.0f} |"
        )
print()
print("| conns | build | p99 / nginx | p99 / HAProxy | req/s / nginx | CPU/req / nginx | goal met |")
print("|---|---|---|---|---|---|---|")
for conns in order:
    for name in TARGETS[2:]:
        if not cells[(name, conns)]:
            continue
        p99 = median(name, conns, 2)
        by_nginx = p99 / median("nginx", conns, 2)
        by_haproxy = p99 / median("haproxy", conns, 2)
        rps = median(name, conns, 0) / median("nginx", conns, 0)
        cpu = median(name, conns, 4) / median("nginx", conns, 4)
        met = "yes" if by_nginx <= 1.0 and by_haproxy <= 1.2 and rps >= 1.0 else "no"
        print(
            f"| {conns} | {name.split('-')[1]} | {by_nginx:.2f}x | {by_haproxy:.2f}x "
            f"| {rps:.2f}x | {cpu:.2f}x | {met} |"
        )
