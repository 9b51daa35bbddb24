"""abandon: clients that give up. Poisson arrivals of PixelCNN sample requests (n 4..8) at a rate that keeps the
sampler busy, twice on the same arrivals: once where nobody gives up, once where a fixed share of the clients close
their connection GIVE_UP_S after sending, unanswered. Their sequences must leave the sampler at the next step, so
those who stay should be served at least as fast as when nobody left. Reports the p50 / p99 of those who stay (the
same requests in both runs), the number that gave up, and what the server counted: genserve_cancelled_total by
stage, the 499s, the sampling steps and the images it finished.

Every request goes on a connection of its own (raw asyncio streams), so closing it is what a client that gives up
does, and nothing else shares it."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import numpy as np

from bench import prom
from bench.openloop import request_bytes
from bench.scenarios import Context, _floor, _json, run_async
from bench.server import HOST, Server
from bench.stats import latency_summary, poisson_schedule

PATH = "/v1/pixelcnn/sample"
GIVE_UP_S = 1.0
SHARE = 0.3  # of the clients give up
N_RANGE = (4, 8)  # images per request, uniform
LOAD = 0.8  # of the sampler's throughput at full width, in sequences per second
MAX_ACTIVE = 64


async def _request(port: int, payload: bytes, give_up_s: float | None) -> str:
    """One request on a fresh connection: its status, or "gave_up" when give_up_s passed without an answer (the
    connection is closed then, unanswered)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(payload)

        async def answer() -> str:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            return head[9:12].decode()

        try:
            return await asyncio.wait_for(answer(), give_up_s)
        except TimeoutError:
            return "gave_up"
    finally:
        writer.close()


async def _load(port: int, payloads: list[bytes], schedule: np.ndarray, quitters: np.ndarray,
                give_up: bool) -> tuple[list[str], list[float]]:
    """Every request at its arrival time; statuses and latencies (from the scheduled arrival) in schedule order."""
    t0 = time.perf_counter() + 0.05
    latencies = [float("nan")] * len(schedule)

    async def one(i: int) -> str:
        await asyncio.sleep(max(0.0, t0 + schedule[i] - time.perf_counter()))
        status = await _request(port, payloads[i], GIVE_UP_S if give_up and quitters[i] else None)
        latencies[i] = time.perf_counter() - (t0 + schedule[i])
        return status

    statuses = await asyncio.gather(*(one(i) for i in range(len(schedule))))
    return list(statuses), latencies


def _metrics(base: str) -> dict[prom.Sample, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        return prom.parse(r.read().decode())


def _wait_idle(base: str, timeout_s: float = 60.0) -> None:
    """Until the sampler has neither queued sequences nor steps running (two scrapes 0.2 s apart agree)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:  # bounded
        m = _metrics(base)
        steps = prom.total(m, "genserve_sampler_active_sequences_count", model="pixelcnn")
        if prom.total(m, "genserve_queue_depth", model="pixelcnn", graph="sampler") == 0 and steps == last:
            return
        last = steps
        time.sleep(0.2)
    raise RuntimeError("the sampler did not go idle")


def _calibrate(srv: Server) -> float:
    """Seconds one n=64 request takes alone: 784 steps at full width."""
    started = time.perf_counter()
    status = run_async(_request(srv.port, request_bytes(HOST, srv.port, "POST", PATH, _json({"n": MAX_ACTIVE,
                                                                                           "seed": 0})), None))
    if status != "200":
        raise RuntimeError(f"POST {PATH} answered {status}")
    return time.perf_counter() - started


def abandon(ctx: Context) -> dict:
    duration = 8.0 if ctx.quick else 30.0
    rng = np.random.default_rng(13)
    with Server(ctx.store, sampler_max_active=MAX_ACTIVE) as srv:
        full_width_s = _calibrate(srv)
        sequences_per_s = MAX_ACTIVE / full_width_s
        rate = LOAD * sequences_per_s / np.mean(N_RANGE)
        schedule = poisson_schedule(rate, duration, rng)
        sizes = rng.integers(N_RANGE[0], N_RANGE[1] + 1, len(schedule))
        quitters = rng.random(len(schedule)) < SHARE
        payloads = [request_bytes(HOST, srv.port, "POST", PATH, _json({"n": int(n), "seed": i}))
                    for i, n in enumerate(sizes)]
        print(f"  n={MAX_ACTIVE} alone {full_width_s:.2f} s ({sequences_per_s:.1f} sequences/s at full width); "
              f"offered {rate:.2f} requests/s of n {N_RANGE[0]}..{N_RANGE[1]} for {duration:.0f} s "
              f"({len(schedule)} requests, {int(quitters.sum())} of them give up after {GIVE_UP_S:g} s in the "
              f"second run)", flush=True)
        runs = {}
        for mode in ("stay", "give_up"):
            _wait_idle(srv.base)
            before = _metrics(srv.base)
            started = time.perf_counter()
            statuses, latencies = run_async(_load(srv.port, payloads, schedule, quitters, mode == "give_up"))
            elapsed = time.perf_counter() - started
            _wait_idle(srv.base)
            after = _metrics(srv.base)

            def delta(name: str, **labels: str) -> float:
                return prom.delta(before, after, name, **labels)  # noqa: B023 (used within the iteration)

            stayers = [lat for lat, s, q in zip(latencies, statuses, quitters, strict=True) if not q and s == "200"]
            runs[mode] = {
                "seconds": elapsed,
                "requests": len(schedule),
                "ok": statuses.count("200"),
                "gave_up": statuses.count("gave_up"),
                "other": len(statuses) - statuses.count("200") - statuses.count("gave_up"),
                "stayers": int((~quitters).sum()),
                "stayers_ok": len(stayers),
                "stayers_latency": latency_summary(stayers),
                "all_latency": latency_summary([lat for lat, s in zip(latencies, statuses, strict=True)
                                                if s == "200"]),
                "cancelled": {stage: delta("genserve_cancelled_total", model="pixelcnn", graph="sampler",
                                           stage=stage) for stage in ("queued", "sampling")},
                "http_499": delta("genserve_http_requests_total", route=PATH, status="499"),
                "steps": delta("genserve_sampler_active_sequences_count", model="pixelcnn"),
                "sequence_steps": delta("genserve_sampler_active_sequences_sum", model="pixelcnn"),
                "images": delta("genserve_items_processed_total", model="pixelcnn", graph="sampler"),
            }
            r = runs[mode]
            print(f"  {mode:8s} stayers p50 {r['stayers_latency']['p50_ms']:.0f} ms p99 "
                  f"{r['stayers_latency']['p99_ms']:.0f} ms ({r['stayers_ok']}/{r['stayers']} answered 200); "
                  f"gave up {r['gave_up']}; cancelled {r['cancelled']}; 499s {r['http_499']:.0f}; steps "
                  f"{r['steps']:.0f}, sequence-steps {r['sequence_steps']:.0f}, images {r['images']:.0f}",
                  flush=True)
    gave_up, counted = runs["give_up"]["gave_up"], sum(runs["give_up"]["cancelled"].values())
    stay, quit_ = runs["stay"]["stayers_latency"], runs["give_up"]["stayers_latency"]
    return {"abandon": {"give_up_s": GIVE_UP_S, "share": SHARE, "n_range": list(N_RANGE), "load": LOAD,
                        "full_width_s": full_width_s, "rate_per_s": rate, "duration_s": duration, "runs": runs,
                        "p50_ratio": quit_["p50_ms"] / stay["p50_ms"], "p99_ratio": quit_["p99_ms"] / stay["p99_ms"]},
            "floors": [
                _floor("abandon: clients that gave up, counted in genserve_cancelled_total",
                       counted / gave_up if gave_up else float("nan"), 0.95, "share"),
                _floor("abandon: those who stay, answered 200",
                       runs["give_up"]["stayers_ok"] / runs["give_up"]["stayers"], 1.0, "share")]}
