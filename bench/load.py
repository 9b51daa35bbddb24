"""The load generator: one asyncio client (aiohttp, keep-alive connections) in this process.

Closed loop: N workers, each sending its next request as soon as the previous answer is read. The run is cut
into windows; after a warm-up window it stops once the last two windows' throughputs agree within the
tolerance, or after `max_windows`. Figures come from the last two windows, with a /metrics scrape at each
window boundary so the server-side split covers exactly those windows.

Open loop: requests start at Poisson arrival times whatever the server does; latency runs from the scheduled
arrival (so a late start counts against the server, no coordinated omission). Requests still unanswered when
the drain limit passes are cancelled and counted as unfinished.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from bench import prom
from bench.stats import is_stable, latency_summary, poisson_schedule

JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Workload:
    """What one request is: method, path, a cycle of pre-serialized bodies, images produced per request."""
    name: str
    method: str
    path: str
    bodies: Sequence[bytes] = (b"",)
    images_per_request: int = 1


@dataclass(frozen=True)
class Windows:
    seconds: float = 2.0
    max_windows: int = 8
    tolerance: float = 0.10


@dataclass
class _Record:
    done: float  # completion time (perf_counter)
    latency: float
    status: str  # HTTP status code, or "conn_error" / "timeout"


@dataclass
class Result:
    """One load level: throughput, latency, errors, server-side split."""
    workload: str
    mode: str  # "closed" or "open"
    level: float  # concurrency (closed) or offered rate per second (open)
    seconds: float = 0.0
    requests: int = 0
    ok: int = 0
    rps: float = 0.0
    images_per_s: float = 0.0
    latency: dict[str, float] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    window_rps: list[float] = field(default_factory=list)
    stable: bool = False
    offered: int = 0  # open loop: requests scheduled
    unfinished: int = 0  # open loop: still unanswered at the drain limit (latency counted up to it: a lower bound)
    server: dict[str, float] = field(default_factory=dict)
    cpu_us: dict[str, float] = field(default_factory=dict)  # CPU per request: {"server": us, "client": us}

    @property
    def errors(self) -> dict[str, int]:
        return {k: v for k, v in self.statuses.items() if k != "200"}


def new_session(connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections + 4, keepalive_timeout=60, ttl_dns_cache=None)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600))


async def _send(session: aiohttp.ClientSession, url: str, w: Workload, body: bytes) -> str:
    try:
        if w.method == "GET":
            async with session.get(url) as r:
                await r.read()
                return str(r.status)
        async with session.post(url, data=body, headers=JSON_HEADERS) as r:
            await r.read()
            return str(r.status)
    except TimeoutError:
        return "timeout"
    except aiohttp.ClientError:
        return "conn_error"


async def one_request(base: str, w: Workload, body: bytes) -> str:
    """A single request on a fresh connection; its status."""
    async with new_session(1) as session:
        return await _send(session, base + w.path, w, body)


async def scrape(session: aiohttp.ClientSession, base: str) -> dict[prom.Sample, float]:
    async with session.get(base + "/metrics") as r:
        return prom.parse(await r.text())


def _summarize(res: Result, records: Sequence[_Record], seconds: float) -> None:
    statuses = Counter(r.status for r in records)
    res.seconds, res.requests, res.ok = seconds, len(records), statuses.get("200", 0)
    res.rps = res.ok / seconds if seconds > 0 else 0.0
    res.statuses = dict(sorted(statuses.items()))
    res.latency = latency_summary([r.latency for r in records if r.status == "200"])


CpuProbe = Callable[[], tuple[float, float]]  # () -> (server CPU seconds, client CPU seconds) so far


async def closed_loop(base: str, w: Workload, concurrency: int, windows: Windows,
                      split_for: tuple[str, str] | None = None, cpu: CpuProbe | None = None) -> Result:
    """`concurrency` workers back to back; windows until stable; figures from the last two windows.
    With `cpu`, the CPU per request of the server and of this client over those windows too."""
    url = base + w.path
    records: list[_Record] = []
    stop = asyncio.Event()
    bodies = itertools.cycle(w.bodies)

    async with new_session(concurrency) as session, new_session(1) as scraper:
        async def worker() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                status = await _send(session, url, w, next(bodies))
                t1 = time.perf_counter()
                records.append(_Record(t1, t1 - t0, status))

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        try:
            t_start = time.perf_counter()
            bounds, snaps, rates, cut = [t_start], [await scrape(scraper, base)], [], 0
            cpus = [cpu()] if cpu else []
            for k in range(windows.max_windows):
                await asyncio.sleep(max(0.0, t_start + (k + 1) * windows.seconds - time.perf_counter()))
                bounds.append(time.perf_counter())
                if cpu:
                    cpus.append(cpu())
                snaps.append(await scrape(scraper, base))
                ok = 0
                while cut < len(records) and records[cut].done <= bounds[-1]:  # records are in completion order
                    ok += records[cut].status == "200"
                    cut += 1
                rates.append(ok / (bounds[-1] - bounds[-2]))
                if k >= 2 and is_stable(rates[1:], windows.tolerance):  # window 0 is warm-up
                    break
        finally:
            stop.set()
            await asyncio.wait(tasks, timeout=30)
            for t in tasks:
                t.cancel()
    lo, hi = bounds[-3], bounds[-1]
    res = Result(w.name, "closed", concurrency, window_rps=rates, stable=is_stable(rates[1:], windows.tolerance))
    _summarize(res, [r for r in records if lo < r.done <= hi], hi - lo)
    res.images_per_s = res.rps * w.images_per_request
    if split_for is not None:
        res.server = prom.split(snaps[-3], snaps[-1], *split_for)
    if cpu and res.requests:
        (server0, client0), (server1, client1) = cpus[-3], cpus[-1]
        res.cpu_us = {"server": 1e6 * (server1 - server0) / res.requests,
                      "client": 1e6 * (client1 - client0) / res.requests}
    return res


async def open_loop(base: str, w: Workload, rate: float, duration_s: float, drain_s: float, seed: int = 0,
                    split_for: tuple[str, str] | None = None) -> Result:
    """Poisson arrivals at `rate` per second for `duration_s`; waits at most `drain_s` more for answers."""
    url = base + w.path
    schedule = poisson_schedule(rate, duration_s, np.random.default_rng(seed))
    records: list[_Record] = []
    bodies = itertools.cycle(w.bodies)
    async with new_session(len(schedule)) as session, new_session(1) as scraper:
        before = await scrape(scraper, base)
        t0 = time.perf_counter()

        async def one(at: float, body: bytes) -> None:
            status = await _send(session, url, w, body)
            t1 = time.perf_counter()
            records.append(_Record(t1, t1 - (t0 + at), status))

        tasks: dict[asyncio.Task, float] = {}
        for at in schedule:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            tasks[asyncio.create_task(one(float(at), next(bodies)))] = float(at)
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, t0 + duration_s + drain_s - time.perf_counter()))
        elapsed = time.perf_counter() - t0
        after = await scrape(scraper, base)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    res = Result(w.name, "open", rate, offered=len(schedule), unfinished=len(pending))
    _summarize(res, records, elapsed)
    censored = [elapsed - tasks[t] for t in pending]
    res.latency = latency_summary([r.latency for r in records if r.status == "200"] + censored)
    res.images_per_s = res.rps * w.images_per_request
    if split_for is not None:
        res.server = prom.split(before, after, *split_for)
    return res
