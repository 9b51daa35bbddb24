"""Two scenarios of the service past and near its capacity, with the open-loop generator (openloop.py).

overload: per route (GAN sample, one-image logprob), the capacity measured closed-loop, then Poisson arrivals at
1x, 2x and 3x of it. What a client sees: the share answered 200 / 503 / otherwise / not at all, the p50 and p99
of the 200s, and the p99 time to any answer. Floors at 3x: at least 99.9% answered, p99 of the 200s within 1 s
(GAN) or 3 s (logprob), and nothing lost.

soak: a mix of routes at 80% of the mix's capacity for ten minutes (--quick: 20 s): the server's RSS at the start
and the end, errors, and the drift of the p99 from the first minute to the last. Floors: RSS growth below 5%,
zero errors.
"""

from __future__ import annotations

import time

from bench.load import Workload, closed_loop
from bench.openloop import LOST, NO_ANSWER, Outcome, closed_loop_rate, open_loop, request_bytes
from bench.scenarios import Context, _floor, _json, logprob_workload, run_async
from bench.server import HOST, Server

ROUTES = {"gan": 1000.0, "logprob": 3000.0}  # route -> the p99 floor of its 200s at 3x, in ms


def gan_workload() -> Workload:
    return Workload("gan", "POST", "/v1/gan/sample", [_json({"n": 1, "seed": s}) for s in range(64)])


def vae_workload() -> Workload:
    return Workload("vae", "POST", "/v1/vae/sample", [_json({"n": 1, "seed": s}) for s in range(64)])


def raw_requests(port: int, w: Workload) -> list[bytes]:
    return [request_bytes(HOST, port, w.method, w.path, body) for body in w.bodies]


def capacity(srv: Server, w: Workload, ctx: Context, concurrency: int = 64) -> float:
    """Requests per second the server answers 200 at `concurrency` clients back to back."""
    r = run_async(closed_loop(srv.base, w, concurrency, ctx.windows))
    print(f"  {w.name}: capacity {r.rps:,.0f} req/s (closed loop, c={concurrency}, p99 {r.latency['p99_ms']:.0f} ms)",
          flush=True)
    return r.rps


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _level_row(route: str, load: float, o: Outcome) -> dict:
    other = sum(n for s, n in o.statuses.items() if s not in ("200", "503", *NO_ANSWER))
    return {"route": route, "load": load, "rate": o.rate, "seconds": o.seconds, "offered": o.offered,
            "ok": o.statuses.get("200", 0), "503": o.statuses.get("503", 0), "other": other,
            "no_answer": o.offered - o.answered, "lost": o.lost, "answered_share": o.answered_share,
            "ok_p50_ms": o.ok_latency["p50_ms"], "ok_p99_ms": o.ok_latency["p99_ms"],
            "answer_p99_ms": o.answer_latency["p99_ms"], "connections": o.connections, "statuses": o.statuses,
            "generator_send_lag_p99_ms": o.send_lag["p99_ms"]}


def _print_level(row: dict) -> None:
    print(f"  {row['route']:8s} {row['load']:g}x {row['rate']:7.0f}/s x{row['offered']:<6d} 200 {row['ok']:<6d} "
          f"503 {row['503']:<6d} other {row['other']:<4d} no answer {row['no_answer']:<4d} (lost {row['lost']})  "
          f"answered {row['answered_share']:.2%}  200s p50 {row['ok_p50_ms']:.0f} ms p99 {row['ok_p99_ms']:.0f} ms  "
          f"any answer p99 {row['answer_p99_ms']:.0f} ms  connections {row['connections']}", flush=True)


def overload(ctx: Context) -> dict:
    seconds = 4.0 if ctx.quick else 15.0
    workloads = {"gan": gan_workload(), "logprob": logprob_workload(ctx)}
    rows, floors, capacities = [], [], {}
    for route, p99_floor_ms in ROUTES.items():
        w = workloads[route]
        with Server(ctx.store) as srv:
            capacities[route] = cap = capacity(srv, w, ctx)
            for load in (1.0, 2.0, 3.0):
                o = open_loop(HOST, srv.port, raw_requests(srv.port, w), load * cap, seconds, seed=int(load))
                rows.append(row := _level_row(route, load, o))
                _print_level(row)
        at3 = rows[-1]
        floors += [
            _floor(f"overload, {route} at 3x capacity: share of requests answered", at3["answered_share"], 0.999,
                   "share"),
            _floor(f"overload, {route} at 3x capacity: p99 of the 200s", at3["ok_p99_ms"], p99_floor_ms, "max_ms"),
            _floor(f"overload, {route} at 3x capacity: requests lost (sent, never answered)", at3["lost"], 0,
                   "max_count"),
        ]
    return {"overload": {"seconds": seconds, "capacities": capacities, "levels": rows}, "floors": floors}


def mixed(requests: list[list[bytes]], weights: list[float]) -> list[bytes]:
    """One cycle of requests from several routes, each route's share proportional to its weight (at least one
    request each), spread evenly through the cycle."""
    counts = [max(1, round(w / min(weights))) for w in weights]
    slots = sorted((k / n, i, k) for i, n in enumerate(counts) for k in range(n))
    return [requests[i][k % len(requests[i])] for _, i, k in slots]


def soak(ctx: Context) -> dict:
    seconds = 20.0 if ctx.quick else 600.0
    window = 5.0 if ctx.quick else 60.0
    mix = [gan_workload(), logprob_workload(ctx), vae_workload()]
    probe_s = 2.0 if ctx.quick else 5.0
    with Server(ctx.store) as srv:
        # Each route in proportion to its own capacity, so that each takes an equal share of the machine (equal
        # request counts would make the mix a logprob run with some GAN traffic); the mix's capacity measured as
        # such, back to back at c=64: the routes share the CPU in ways no sum of their figures captures.
        alone = {w.name: closed_loop_rate(HOST, srv.port, raw_requests(srv.port, w), 64, probe_s) for w in mix}
        requests = mixed([raw_requests(srv.port, w) for w in mix], [alone[w.name] for w in mix])
        closed = closed_loop_rate(HOST, srv.port, requests, 64, 2 * probe_s)
        # Poisson arrivals batch less well than clients back to back, so the server sustains less of them: its
        # capacity here is what it answers 200 when offered the closed-loop figure open-loop.
        probe = open_loop(HOST, srv.port, requests, closed, 2 * probe_s, seed=7)
        cap = probe.statuses.get("200", 0) / probe.seconds
        rate = 0.8 * cap
        pid = srv.proc.pid
        rss_start = rss_mib(pid)
        print(f"  mix {', '.join(w.name for w in mix)}: {closed:,.0f} req/s closed loop at c=64, of which open loop "
              f"{cap:,.0f} answered 200 (the capacity); "
              f"{rate:,.0f} req/s for {seconds:.0f} s; RSS {rss_start:.0f} MiB", flush=True)
        t0 = time.monotonic()
        o = open_loop(HOST, srv.port, requests, rate, seconds, window_s=window)
        rss_end = rss_mib(pid)
    errors = {s: n for s, n in o.statuses.items() if s != "200"}
    drift = o.ok_p99_by_window[-1] / o.ok_p99_by_window[0] if len(o.ok_p99_by_window) >= 2 else float("nan")
    growth = rss_end / rss_start - 1.0
    print(f"  soak: {o.offered} requests in {time.monotonic() - t0:.0f} s, errors {errors or '-'}; RSS {rss_start:.0f} "
          f"-> {rss_end:.0f} MiB ({growth:+.1%}); p99 of the 200s by {window:.0f} s window: "
          f"{', '.join(f'{x:.0f}' for x in o.ok_p99_by_window)} ms (last / first {drift:.2f}x)", flush=True)
    result = {"seconds": seconds, "rate": rate, "capacity": cap, "closed_loop": closed, "routes": alone,
              "offered": o.offered, "statuses": o.statuses,
              "errors": sum(errors.values()), "lost": sum(o.statuses.get(s, 0) for s in LOST),
              "rss_start_mib": rss_start, "rss_end_mib": rss_end, "rss_growth": growth,
              "ok_p99_by_window_ms": o.ok_p99_by_window, "window_s": window, "p99_drift": drift,
              "ok_latency": o.ok_latency}
    return {"soak": result, "floors": [
        _floor("soak: RSS growth over the run", growth, 0.05, "max_share"),
        _floor("soak: requests not answered 200", result["errors"], 0, "max_count")]}

