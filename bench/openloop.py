"""An open-loop load generator fast enough to overload the server: several processes of raw asyncio HTTP/1.1.

aiohttp's client costs more CPU per request than the GAN route costs the server, so it cannot offer three times
the server's capacity from the same two cores. Here each process sends pre-built request bytes on keep-alive
connections and parses only the status line and Content-Length. Requests start at Poisson arrival times
whatever the server does; a request finding no idle connection opens a new one, so a slow server faces ever
more connections, as it would from real independent clients. Latency counts from the scheduled arrival.

Outcomes: an HTTP status ("200", "503", ...), or no answer: "refused" (the connection was never accepted),
"reset" (the request was sent and the connection closed without an answer) or "timeout" (no answer by the
drain limit). "reset" and "timeout" are lost requests.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bench.stats import latency_summary, poisson_schedule

NO_ANSWER = ("refused", "reset", "timeout")
LOST = ("reset", "timeout")
_IDLE_S = 2.0  # reuse a connection idle at most this long: the server closes idle ones after 5 s
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        head = bytes(self.buffer[:end])
        length = int(m.group(1)) if (m := _LENGTH.search(head)) else 0
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[:end + 4 + length]
        if _CLOSE.search(head):
            self.closed = True
        self.waiter.set_result(int(head[9:12]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("closed without an answer"))


@dataclass
class Part:
    """What one generator process saw."""
    statuses: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds from scheduled arrival, one per status
    arrivals: list[float] = field(default_factory=list)  # scheduled arrival (s from the start), one per status
    send_lags: list[float] = field(default_factory=list)  # seconds from scheduled arrival to the request's write
    connections: int = 0  # connections opened

    def record(self, status: str, at: float, now: float, start_at: float) -> None:
        self.statuses.append(status)
        self.latencies.append(now - (start_at + at))
        self.arrivals.append(at)


async def _run(host: str, port: int, requests: Sequence[bytes], schedule: np.ndarray, start_at: float,
               drain_s: float) -> Part:
    loop = asyncio.get_running_loop()
    part, idle = Part(), []  # idle: a stack, so the most recently used connection goes first

    async def connection() -> _Connection:
        while idle:
            conn = idle.pop()
            if not conn.closed and loop.time() - conn.idle_since < _IDLE_S:
                return conn
            if conn.transport is not None:
                conn.transport.close()
        _, conn = await loop.create_connection(_Connection, host, port)
        part.connections += 1
        return conn

    async def one(at: float, request: bytes) -> None:
        try:
            conn = await connection()
        except OSError:
            part.record("refused", at, time.time(), start_at)
            return
        conn.waiter = loop.create_future()
        conn.transport.write(request)
        part.send_lags.append(time.time() - (start_at + at))
        try:
            status = str(await conn.waiter)
        except ConnectionResetError:
            status = "reset"
        part.record(status, at, time.time(), start_at)
        if not conn.closed:
            conn.waiter, conn.idle_since = None, loop.time()
            idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    tasks: dict[asyncio.Task, float] = {}
    await asyncio.sleep(max(0.0, start_at - time.time()))
    i = 0
    while i < len(schedule):
        now = time.time() - start_at
        while i < len(schedule) and schedule[i] <= now:  # everything due: late ones go at once
            tasks[asyncio.create_task(one(float(schedule[i]), requests[i % len(requests)]))] = float(schedule[i])
            i += 1
        await asyncio.sleep(0.0005)
    end = start_at + (schedule[-1] if len(schedule) else 0.0) + drain_s
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, end - time.time())) if tasks else (set(), set())
    for task in pending:
        task.cancel()
        part.record("timeout", tasks[task], end, start_at)
    await asyncio.gather(*pending, return_exceptions=True)
    for conn in idle:
        if conn.transport is not None:
            conn.transport.close()
    return part


def _process(args: tuple) -> Part:
    try:
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_run(*args))
    except ImportError:
        return asyncio.run(_run(*args))


async def _closed(host: str, port: int, requests: Sequence[bytes], concurrency: int, seconds: float) -> int:
    loop = asyncio.get_running_loop()
    end, ok, turn = time.time() + seconds, 0, 0

    async def worker() -> None:
        nonlocal ok, turn
        _, conn = await loop.create_connection(_Connection, host, port)
        try:
            while time.time() < end:
                request, turn = requests[turn % len(requests)], turn + 1
                conn.waiter = loop.create_future()
                conn.transport.write(request)
                status = await conn.waiter  # awaited before `ok` is read: `ok += await ...` loses counts
                ok += status == 200
        finally:
            conn.transport.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok


def closed_loop_rate(host: str, port: int, requests: Sequence[bytes], concurrency: int = 64,
                     seconds: float = 10.0) -> float:
    """200s per second with `concurrency` connections sending back to back, cycling through `requests` (which
    may mix routes): the capacity of a mix, which no single route's figure gives when they share the CPU."""
    return asyncio.run(_closed(host, port, requests, concurrency, seconds)) / seconds


def request_bytes(host: str, port: int, method: str, path: str, body: bytes = b"") -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


@dataclass
class Outcome:
    rate: float
    seconds: float
    offered: int
    statuses: dict[str, int]
    answered: int
    lost: int
    ok_latency: dict[str, float]  # of the 200s
    answer_latency: dict[str, float]  # of every answer, whatever its status
    connections: int
    send_lag: dict[str, float]  # the generator's own lateness in sending: large means it could not keep up
    ok_p99_by_window: list[float]  # p99 (ms) of the 200s by arrival window (drift over a long run)

    @property
    def answered_share(self) -> float:
        return self.answered / self.offered if self.offered else float("nan")


def open_loop(host: str, port: int, requests: Sequence[bytes], rate: float, seconds: float, drain_s: float = 30.0,
              processes: int = 2, seed: int = 0, window_s: float = 60.0) -> Outcome:
    """Poisson arrivals at `rate` per second for `seconds`, split over `processes` generator processes; waits at
    most `drain_s` past the last arrival for answers. `window_s`: the windows of ok_p99_by_window."""
    parts_args = []
    start_at = time.time() + 1.5  # the processes start together, once spawned
    for k in range(processes):
        schedule = poisson_schedule(rate / processes, seconds, np.random.default_rng(seed * 1000 + k))
        parts_args.append((host, port, list(requests), schedule, start_at, drain_s))
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_process, parts_args)
    statuses = Counter(s for p in parts for s in p.statuses)
    pairs = [(s, t) for p in parts for s, t in zip(p.statuses, p.latencies, strict=True)]
    windows: dict[int, list[float]] = {}
    for p in parts:
        for s, t, at in zip(p.statuses, p.latencies, p.arrivals, strict=True):
            if s == "200":
                windows.setdefault(int(at // window_s), []).append(t)
    answered = sum(n for s, n in statuses.items() if s not in NO_ANSWER)
    return Outcome(rate=rate, seconds=seconds, offered=sum(len(a[3]) for a in parts_args),
                   statuses=dict(sorted(statuses.items())), answered=answered,
                   lost=sum(statuses.get(s, 0) for s in LOST),
                   ok_latency=latency_summary([t for s, t in pairs if s == "200"]),
                   answer_latency=latency_summary([t for s, t in pairs if s not in NO_ANSWER]),
                   connections=sum(p.connections for p in parts),
                   send_lag=latency_summary([t for p in parts for t in p.send_lags]),
                   ok_p99_by_window=[latency_summary(windows[k])["p99_ms"] for k in sorted(windows)])
