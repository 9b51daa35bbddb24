"""CPU accounting from /proc (Linux only; elsewhere the figures are NaN).

Was the machine ours? A benchmark on a shared machine is only as good as its quiet: /proc/stat gives every
CPU-second the machine spent busy, os.times() the seconds this process and its finished children (the servers
it stopped) spent, so the difference is what everything else took (CpuMeter).

Where does a request's CPU go? process_tree_seconds reads a live server (all its workers and threads), and
own_seconds the load generator, so a level's CPU per request splits into server and client.
"""

from __future__ import annotations

import math
import os
import time


def _proc_stat() -> tuple[float, float]:
    """(busy seconds excluding steal, steal seconds) summed over all CPUs since boot."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _ours() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def process_tree_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its live descendants (every thread); NaN when unreadable."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent pid, cpu seconds)
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return math.nan
    for entry in entries:
        try:
            text = open(f"/proc/{entry}/stat").read()
        except OSError:  # gone since the listing
            continue
        fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    if pid not in stats:
        return math.nan
    total, frontier = 0.0, [pid]
    while frontier:
        p = frontier.pop()
        total += stats[p][1]
        frontier += [child for child, (parent, _) in stats.items() if parent == p]
    return total


def own_seconds() -> float:
    """User + system CPU seconds of this process (all its threads), not of its children."""
    t = os.times()
    return t.user + t.system


class CpuMeter:
    def __init__(self) -> None:
        try:
            self._start = (*_proc_stat(), _ours(), time.monotonic())
        except (OSError, ValueError):
            self._start = None

    def read(self) -> dict[str, float]:
        """Core-seconds used by other processes and stolen, and the share of the machine they took."""
        if self._start is None:
            return {"others_s": math.nan, "steal_s": math.nan, "others_share": math.nan}
        busy0, steal0, ours0, t0 = self._start
        busy, steal = _proc_stat()
        capacity = (time.monotonic() - t0) * (os.cpu_count() or 1)
        others = max(0.0, (busy - busy0) - (_ours() - ours0))
        return {"others_s": others, "steal_s": steal - steal0,
                "others_share": (others + steal - steal0) / capacity if capacity > 0 else math.nan}
