"""The process's memory as the kernel counts it, what loading cost, and giving freed memory back to the system.

Nothing here knows ONNX Runtime (service.runtime shrinks its arena); reading /proc and calling glibc's
malloc_trim are all this module does, and where neither exists (not Linux, not glibc) every function answers
"unknown" (None, {} or False) instead of failing: memory figures are a side channel, never a reason to refuse a
request or a model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

# /proc/<pid>/status fields (kB) -> the names this service reports them under (bytes).
_STATUS_FIELDS = {"VmRSS": "rss_bytes", "VmHWM": "rss_peak_bytes", "RssAnon": "rss_anon_bytes",
                  "RssFile": "rss_file_bytes", "RssShmem": "rss_shmem_bytes"}


def process_memory(pid: int | str = "self") -> dict[str, int]:
    """Resident memory of a process in bytes: `rss_bytes` (VmRSS, what a container's memory limit is held
    against), `rss_peak_bytes` (VmHWM, the highest RSS so far), and its split into anonymous (heap, arenas),
    file-backed (shared libraries) and shared memory. {} where /proc cannot be read."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in _STATUS_FIELDS:
            try:
                out[_STATUS_FIELDS[key]] = int(value.split()[0]) * 1024
            except (IndexError, ValueError):
                continue
    return out


def rss_bytes(pid: int | str = "self") -> int | None:
    return process_memory(pid).get("rss_bytes")


def process_age(pid: int | str = "self") -> float | None:
    """Seconds since the process started: the system's uptime (/proc/uptime) less the process's start in clock
    ticks after boot (/proc/<pid>/stat, field 22). To a clock tick (10 ms); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # after the name (which may hold spaces): field 22
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@lru_cache(maxsize=1)
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def malloc_trim() -> bool:
    """glibc's malloc_trim(0): hand the free pages of every malloc arena back to the system. A block that
    ONNX Runtime's arena freed stays in the C heap, resident, until this (or until the heap's top is free).
    False where there is no glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


_M_ARENA_MAX = -8  # mallopt parameter, glibc's malloc.h


def set_malloc_arenas(n: int) -> bool:
    """Cap glibc's malloc arenas of this process at n (mallopt M_ARENA_MAX); 0 leaves glibc's default (8 per
    core). Each thread that allocates gets an arena of its own up to the cap, and free memory scattered over many
    arenas is what malloc_trim cannot give back. Effective only before the process has made its arenas: call it
    first thing. False where there is no glibc or it refused."""
    libc = _libc()
    if n <= 0 or libc is None:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, n))


T = TypeVar("T")


@dataclass(frozen=True)
class Cost:
    """What one loading step cost: wall-clock seconds, and the change in this process's RSS (which includes
    whatever else ran meanwhile: exact at start-up, where loading runs alone)."""
    seconds: float
    rss_bytes: int | None

    def as_dict(self) -> dict[str, float | int | None]:
        return {"seconds": round(self.seconds, 4), "rss_bytes": self.rss_bytes}


def measured(fn: Callable[[], T]) -> tuple[T, Cost]:
    """fn(), and what it cost."""
    before, t0 = rss_bytes(), time.perf_counter()
    result = fn()
    seconds, after = time.perf_counter() - t0, rss_bytes()
    return result, Cost(seconds, None if before is None or after is None else after - before)


class Activity:
    """ONNX Runtime calls in flight and when the last one ended, counted from the threads that make them, so
    that memory is given back only when nothing has run for a while."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        self.calls = 0  # calls finished so far
        self.last_end = time.monotonic()

    def track(self, fn: Callable[[T], Any]) -> Callable[[T], Any]:
        def tracked(arg: T) -> Any:
            with self._lock:
                self.in_flight += 1
            try:
                return fn(arg)
            finally:
                with self._lock:
                    self.in_flight -= 1
                    self.calls += 1
                    self.last_end = time.monotonic()
        return tracked

    def idle_for(self) -> float | None:
        """Seconds since the last call ended, or None while one is running."""
        with self._lock:
            return None if self.in_flight else time.monotonic() - self.last_end


SETTLE_S = 0.25  # how long ONNX Runtime must be idle before memory over the target goes back: past a step's gap
REGROWTH = 32 * 1024 * 1024  # over the target, what RSS must have grown by since the last release to release again


def release_due(idle_s: float | None, called: bool, rss: int | None, *, release_idle_s: float,
                target_bytes: int, released_rss: int | None = None) -> bool:
    """Whether to give memory back now. Never while a call runs (`idle_s` None), nor when no call ran since the
    last release (`called`); then once idle for `release_idle_s`, or sooner, after SETTLE_S, while RSS is above
    `target_bytes` (0: no target) and REGROWTH above what the last release left (`released_rss`). The target
    spares light traffic the cost of faulting its pages back in after every release, and still brings RSS down as
    soon as a burst that raised it ends; the regrowth condition keeps a process whose loaded models alone exceed
    the target from releasing after every call."""
    if idle_s is None or not called:
        return False
    if idle_s >= release_idle_s:
        return True
    if target_bytes <= 0 or idle_s < SETTLE_S or rss is None:
        return False
    return rss > target_bytes and (released_rss is None or rss > released_rss + REGROWTH)
