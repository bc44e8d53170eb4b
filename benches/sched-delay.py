"""Where a proxy's threads ran and how long they waited for a core, from `perf sched timehist`.

    perf sched timehist -i perf.data | python3 benches/sched-delay.py NAME PID...

PIDs are the serving processes (their threads are found by the "[tid/pid]" or "[pid]" field).
Prints one line: the threads' wake-up delays (from being woken to running: p50, p99, p99.9 and
the longest, in ms) and, per thread, the share of its run time spent on each CPU. A worker whose
delays reach milliseconds while its run time sits on the same CPU as another worker's is
waiting out that worker's time slice: its connections wait with it.
"""

import re
import sys
from collections import defaultdict

name, pids = sys.argv[1], set(sys.argv[2:])
line_re = re.compile(r"^\s*[\d.]+\s+\[(\d+)\]\s+(.+?)\[(\d+)(?:/(\d+))?\]\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")
delays = []
runtime = defaultdict(lambda: defaultdict(float))
for line in sys.stdin:
    m = line_re.match(line)
    if not m:
        continue
    cpu, comm, tid, pid, _wait, delay, run = m.groups()
    if (pid or tid) not in pids:
        continue
    delays.append(float(delay))
    runtime[f"{comm}[{tid}]"][int(cpu)] += float(run)


def pct(q):
    return delays[min(len(delays) - 1, int(len(delays) * q))] if delays else 0.0


delays.sort()
placement = []
for thread, per_cpu in sorted(runtime.items(), key=lambda t: -sum(t[1].values())):
    total = sum(per_cpu.values())
    if total < 50:  # ms over the recording: the serving threads, not housekeeping
        continue
    shares = " ".join(f"cpu{c} {v / total:.0%}" for c, v in sorted(per_cpu.items()))
    placement.append(f"{thread} {total:.0f} ms ({shares})")
print(
    f"| {name} | {pct(0.5):.3f} | {pct(0.99):.3f} | {pct(0.999):.3f} | {delays[-1] if delays else 0:.3f} "
    f"| {'; '.join(placement)} |"
)
