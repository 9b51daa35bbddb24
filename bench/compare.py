"""The litserve scenario: the same requests on genserve and on its LitServe peer (litserve_peer.py), side by side.

Each server runs alone on the machine, started as its own process with the same store and ONNX Runtime
settings; the same closed-loop client drives both with the same request bodies at the same concurrency: GAN
n=1 samples at c=64 (as floor 2) and one-image logprob at c=32 (as floor 1). Reported: throughput and p99 of
each, genserve / LitServe ratios, and the CPU per request of each server and of the client. The one floor:
both servers answered every request 200. Before the load, one request of each kind goes to both and their
images and log-likelihoods are compared, so the figures are known to be of the same work.
"""

from __future__ import annotations

import dataclasses
import json
import math
from importlib.metadata import version

from bench.load import Result, Workload, new_session
from bench.overload import gan_workload
from bench.scenarios import Context, _floor, _row, logprob_workload, run_async, sweep
from bench.server import Server
from bench.stats import ratio

LEVELS = {"gan": 64, "logprob": 32}  # closed-loop concurrency per workload, the same on both servers
PEER = "bench.litserve_peer"


async def _answers(base: str, workloads: dict[str, Workload]) -> dict[str, dict]:
    """Each workload's first request, answered."""
    out = {}
    async with new_session(1) as session:
        for name, w in workloads.items():
            async with session.post(base + w.path, data=w.bodies[0],
                                    headers={"Content-Type": "application/json"}) as r:
                r.raise_for_status()
                out[name] = json.loads(await r.read())
    return out


def same_work(genserve: dict[str, dict], litserve: dict[str, dict]) -> bool:
    """The same image bytes for the same seed, and log p(x) equal to float32 rounding (batches differ)."""
    g, p = genserve["gan"], litserve["gan"]
    lg, lp = genserve["logprob"]["results"][0]["logprob"], litserve["logprob"]["results"][0]["logprob"]
    return (g["images"] == p["images"] and g["labels"] == p["labels"]
            and math.isclose(lg, lp, rel_tol=1e-5, abs_tol=1e-3))


def _measure(srv: Server, workloads: dict[str, Workload], ctx: Context, suffix: str,
             split: dict[str, tuple[str, str]]) -> dict[str, Result]:
    return {name: sweep(srv.base, dataclasses.replace(w, name=f"{name} {suffix}"), [LEVELS[name]], ctx,
                        split.get(name), srv.cpu_probe)[0]
            for name, w in workloads.items()}


def litserve(ctx: Context) -> dict:
    workloads = {"gan": gan_workload(), "logprob": logprob_workload(ctx)}
    with Server(ctx.store) as srv:
        genserve_answers = run_async(_answers(srv.base, workloads))
        genserve = _measure(srv, workloads, ctx, "genserve",
                            {"gan": ("gan", "generator"), "logprob": ("pixelcnn", "logprob")})
    with Server(ctx.store, module=PEER, workers=1) as srv:
        peer_answers = run_async(_answers(srv.base, workloads))
        peer = _measure(srv, workloads, ctx, "litserve", {})
    same = same_work(genserve_answers, peer_answers)
    compared = {}
    for name in workloads:
        g, p = genserve[name], peer[name]
        compared[name] = {
            "concurrency": LEVELS[name],
            "genserve_rps": g.rps, "litserve_rps": p.rps, "rps_ratio": ratio(g.rps, p.rps),
            "genserve_p99_ms": g.latency["p99_ms"], "litserve_p99_ms": p.latency["p99_ms"],
            "p99_ratio": ratio(g.latency["p99_ms"], p.latency["p99_ms"]),
            "genserve_cpu_us": g.cpu_us, "litserve_cpu_us": p.cpu_us,
        }
        print(f"  {name} at c={LEVELS[name]}: genserve {g.rps:,.0f} req/s, p99 {g.latency['p99_ms']:.1f} ms; "
              f"LitServe {p.rps:,.0f} req/s, p99 {p.latency['p99_ms']:.1f} ms; genserve / LitServe: throughput "
              f"{compared[name]['rps_ratio']:.2f}x, p99 {compared[name]['p99_ratio']:.2f}x", flush=True)
    print(f"  same images and log-likelihoods from both: {same}", flush=True)
    everything = [*genserve.values(), *peer.values()]
    answered = all(r.requests > 0 and not r.errors for r in everything)
    return {"results": [_row(r) for r in everything],
            "litserve": {"version": version("litserve"), "same_work": same,
                         "batch_timeout_s": _peer_batch_timeout(), "workloads": compared},
            "floors": [_floor("litserve: genserve and the LitServe peer answered every request 200",
                              float(answered), 1.0, "bool")]}


def _peer_batch_timeout() -> float:
    from bench.litserve_peer import BATCH_TIMEOUT_S  # here: the other scenarios run without litserve installed
    return BATCH_TIMEOUT_S
