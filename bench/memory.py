"""memory: the server's resident memory and cold start on the shipped store, and what each memory lever buys.

    python -m bench.memory [--store models_store] [--seconds 60] [--sweep | --spaced]

One server (`python -m service`, default settings): RSS (VmRSS of the server process, /proc) before loading
(interpreter and imports), after warm-up (ready), at its peak during a load run, at the run's last answer, a
second later (past the release GENSERVE_MEMORY_TARGET_MIB makes at the first pause when RSS is over it) and once
the server has been idle long enough to give memory back whatever its RSS (GENSERVE_MEMORY_RELEASE_IDLE_S); the
time from process start to ready, as the client saw it and as the server measured it; and what each model version
and graph cost to load and warm up (GET /v1/models, `process`). The load run drives every model at once for
`--seconds` (60): GAN and VAE samples, VAE encodes, PixelCNN log-likelihoods of one image and of 64, and
labelled (guided) PixelCNN samples of 16 and of 64 on the default version (3: cached steps) and of 64 on
version 1 (row steps: vstack and hrow on 128 sequences per step, twins included). In `make bench` this is the
`memory` scenario.

`--sweep` runs the same once per lever setting (LEVERS), each on a fresh server, and prints one table row each:
the RSS figures and the load run's throughput per workload. `--spaced` measures what a release costs the call
after it (spaced).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import aiohttp

from bench.load import JSON_HEADERS, Workload, new_session
from bench.report import md_table
from bench.scenarios import Context, _floor, _json, load_digits, run_async
from bench.server import Server
from service.imaging import encode_png_b64
from service.memory import process_memory

MIB = 1024 * 1024
BUDGET_MIB = 300.0      # issue 17: RSS after warm-up and after a 60 s load run
COLD_START_S = 3.0      # issue 17: process start to ready
POLL_S = 0.25           # how often RSS is read during the run
SETTLE_S = 1.0          # "after the load run": this long after its last answer (the target release, if any)

# Lever settings for --sweep, from ONNX Runtime's defaults and the old warm-up (main before issue 17) to the
# defaults now. Each is a set of GENSERVE_* overrides on a fresh server.
BEFORE = {"ort_arena": "session", "max_call_images": "{}", "warmup_batch_sizes": "[1, 64]",
          "memory_release_idle_s": "0", "malloc_arenas": "0"}
LEVERS: list[tuple[str, dict[str, str]]] = [
    ("before: arena per session, warm-up at 1 and 64, no slicing, no release", BEFORE),
    ("warm-up at batch 1 only", {**BEFORE, "warmup_batch_sizes": "[1]"}),
    ("+ slicing, 8 images' worth per call", {**BEFORE, "warmup_batch_sizes": "[1]",
                                             "max_call_images": '{"logprob": 8, "vstack": 8, "hrow": 8}'}),
    ("+ arena off", {"memory_release_idle_s": "0", "malloc_arenas": "0"}),
    ("+ release when idle", {"malloc_arenas": "0", "memory_target_mib": "0"}),
    ("+ 2 malloc arenas", {"memory_target_mib": "0"}),
    ("+ release at the first pause over 256 MiB: the defaults", {}),
    ("defaults, one shared arena", {"ort_arena": "shared"}),
    ("defaults, an arena per session", {"ort_arena": "session"}),
    ("defaults without slicing", {"max_call_images": "{}"}),
]


def workloads(digits) -> list[tuple[Workload, int]]:
    """(workload, concurrent clients) of the load run: every model and graph at once."""
    one = [_json({"images": [encode_png_b64(d)]}) for d in digits]
    sixty_four = [_json({"images": [encode_png_b64(d) for d in digits[:64]]})]
    return [
        (Workload("gan n=1", "POST", "/v1/gan/sample", [_json({"n": 1, "seed": s}) for s in range(64)]), 8),
        (Workload("vae sample n=1", "POST", "/v1/vae/sample", [_json({"n": 1, "seed": s}) for s in range(64)]), 4),
        (Workload("vae encode", "POST", "/v1/vae/encode", one), 2),
        (Workload("logprob 1 image", "POST", "/v1/pixelcnn/logprob", one), 8),
        (Workload("logprob 64 images", "POST", "/v1/pixelcnn/logprob", sixty_four, 64), 1),
        (Workload("sample n=16 guided", "POST", "/v1/pixelcnn/sample",
                  [_json({"n": 16, "labels": 3, "seed": s}) for s in range(8)], 16), 1),
        (Workload("sample n=64 guided", "POST", "/v1/pixelcnn/sample",
                  [_json({"n": 64, "labels": 7, "seed": s}) for s in range(8)], 64), 1),
        (Workload("sample n=64 guided v1", "POST", "/v1/pixelcnn/sample",
                  [_json({"n": 64, "labels": 7, "seed": s, "model_version": 1}) for s in range(8)], 64), 1),
    ]


async def _drive(base: str, pid: int, mix: list[tuple[Workload, int]], seconds: float) -> tuple[dict, list]:
    """Every workload closed-loop at its concurrency for `seconds` (requests in flight then finish and count);
    RSS read every POLL_S. Returns ({workload: counts}, [(t, rss bytes)])."""
    stop = asyncio.Event()
    statuses: dict[str, Counter] = {w.name: Counter() for w, _ in mix}
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()

    async def worker(session: aiohttp.ClientSession, w: Workload, k: int) -> None:
        i = k
        while not stop.is_set():
            try:
                async with session.post(base + w.path, data=w.bodies[i % len(w.bodies)], headers=JSON_HEADERS) as r:
                    await r.read()
                    statuses[w.name][str(r.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                statuses[w.name][type(exc).__name__] += 1
            i += 1

    async def poll() -> None:
        while not stop.is_set():
            if (rss := process_memory(pid).get("rss_bytes")) is not None:
                samples.append((time.perf_counter() - t0, rss))
            await asyncio.sleep(POLL_S)

    async with new_session(sum(c for _, c in mix)) as session:
        tasks = [asyncio.create_task(worker(session, w, k)) for w, c in mix for k in range(c)]
        poller = asyncio.create_task(poll())
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks, poller)
    elapsed = time.perf_counter() - t0
    return {w.name: {"requests": sum(statuses[w.name].values()), "ok": statuses[w.name]["200"],
                     "ok_per_s": statuses[w.name]["200"] / elapsed, "images_per_s":
                     statuses[w.name]["200"] * w.images_per_request / elapsed,
                     "errors": {s: n for s, n in statuses[w.name].items() if s != "200"}}
            for w, _ in mix} | {"seconds": elapsed}, samples


def _get(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return json.loads(r.read())


def _mib(x: float | None) -> float | None:
    return None if x is None else x / MIB


def measure(store: Path, seconds: float, digits, **settings: str) -> dict:
    """One fresh server with `settings` (GENSERVE_* overrides): memory and cold start, before, during and after
    the load run."""
    with Server(store, **settings) as srv:
        pid = srv.proc.pid
        ready = process_memory(pid)
        process = _get(srv.base, "/v1/models")["process"]
        idle_s = float(process.get("release", {}).get("idle_s") or 0)
        load, samples = run_async(_drive(srv.base, pid, workloads(digits), seconds))
        ended = time.monotonic()
        after = process_memory(pid)
        time.sleep(SETTLE_S)
        settled = process_memory(pid)
        if idle_s > 0:  # the server gives memory back once idle, whatever its RSS: wait past it
            time.sleep(max(0.0, ended + idle_s + 1.0 - time.monotonic()))
        idle = process_memory(pid)
        releases = _get(srv.base, "/v1/models")["process"]["release"]["releases"]
        startup_s = srv.startup_s
    peak = max([rss for _, rss in samples] + [after.get("rss_bytes", 0)])
    start = process.get("startup", {})
    rss = {"before_loading": _mib(start.get("before_loading_rss_bytes")), "after_warmup": _mib(ready.get("rss_bytes")),
           "load_peak": _mib(peak), "after_load": _mib(after.get("rss_bytes")),
           "after_load_settled": _mib(settled.get("rss_bytes")),
           "after_idle": _mib(idle.get("rss_bytes")) if idle_s > 0 else None,
           "after_warmup_anon": _mib(ready.get("rss_anon_bytes")),
           "after_warmup_file": _mib(ready.get("rss_file_bytes")),
           "after_idle_anon": _mib(idle.get("rss_anon_bytes")), "after_idle_file": _mib(idle.get("rss_file_bytes"))}
    return {"settings": settings, "startup_s": startup_s, "rss_mib": rss, "process": process, "load": load,
            "idle_s": idle_s, "releases": releases,
            "rss_samples": [(round(t, 2), round(b / MIB, 1)) for t, b in samples]}


def _print(name: str, m: dict) -> None:
    r, p = m["rss_mib"], m["process"].get("startup", {})
    after_idle = f"{r['after_idle']:.0f}" if r["after_idle"] is not None else "-"
    print(f"  {name}: ready in {m['startup_s']:.2f} s (server: {p.get('ready_s') or float('nan'):.2f} s, of which "
          f"{p.get('before_loading_s') or float('nan'):.2f} s before loading); RSS MiB: before loading "
          f"{r['before_loading'] or float('nan'):.0f}, after warm-up {r['after_warmup']:.0f}, load peak "
          f"{r['load_peak']:.0f}, at the load run's last answer {r['after_load']:.0f}, {SETTLE_S:.0f} s later "
          f"{r['after_load_settled']:.0f}, after idle {after_idle}", flush=True)
    print("    load run: " + ", ".join(f"{w} {v['images_per_s']:.1f} img/s" + (f" errors {v['errors']}" if v["errors"]
                                                                             else "")
                                       for w, v in m["load"].items() if w != "seconds"), flush=True)


def memory(ctx: Context) -> dict:
    """The `memory` scenario of `make bench`: default settings, one server."""
    m = measure(ctx.store, 15.0 if ctx.quick else 60.0, ctx.digits)
    _print("defaults", m)
    r = m["rss_mib"]
    floors = [_floor("memory: RSS after warm-up (MiB)", r["after_warmup"], BUDGET_MIB, "max_mib"),
              _floor(f"memory: RSS {SETTLE_S:.0f} s after the {m['load']['seconds']:.0f} s load run (MiB)",
                     r["after_load_settled"], BUDGET_MIB, "max_mib"),
              _floor(f"memory: RSS {m['idle_s']:g} s after the load run, idle (MiB)",
                     r["after_idle"] if r["after_idle"] is not None else r["after_load_settled"], BUDGET_MIB,
                     "max_mib"),
              _floor("cold start: process start to ready (s)", m["startup_s"], COLD_START_S, "max_s"),
              _floor("memory: load run requests failed (not 200, nor a 503 of admission control)",
                     failed(m["load"]), 0, "max_count")]
    return {"memory": m, "floors": floors}


def failed(load: dict) -> int:
    """Requests of a load run that neither succeeded nor were shed by admission control (503: by design when the
    queue ahead is too long, and the mix offers more than the machine serves)."""
    return sum(n for w, v in load.items() if w != "seconds" for s, n in v["errors"].items() if s != "503")


def sweep(store: Path, seconds: float, digits, only: list[int] | None = None) -> list[dict]:
    rows = []
    for i, (name, settings) in enumerate(LEVERS):
        if only and i not in only:
            continue
        m = measure(store, seconds, digits, **settings)
        _print(name, m)
        rows.append({"lever": name, **m})
    return rows


def sweep_table(rows: list[dict]) -> str:
    names = [w for w in rows[0]["load"] if w != "seconds"]
    head = ["settings", "ready s", "after warm-up MiB", "load peak MiB", "at the last answer MiB", "1 s later MiB",
            "after idle MiB",
            *[f"{w} img/s" for w in names]]
    cells = [[r["lever"], f"{r['startup_s']:.2f}", f"{r['rss_mib']['after_warmup']:.0f}",
              f"{r['rss_mib']['load_peak']:.0f}", f"{r['rss_mib']['after_load']:.0f}",
              f"{r['rss_mib']['after_load_settled']:.0f}",
              "-" if r["rss_mib"]["after_idle"] is None else f"{r['rss_mib']['after_idle']:.0f}",
              *[f"{r['load'][w]['images_per_s']:.1f}" for w in names]] for r in rows]
    return md_table(head, cells)


def spaced(store: Path, digits, idle_times: tuple[float, ...] = (1.0, 5.0), requests: int = 12,
           gap_s: float = 1.6) -> list[dict]:
    """What a release costs the call after it: per GENSERVE_MEMORY_RELEASE_IDLE_S in `idle_times`, a fresh server
    (default target) answers `requests` 64-image log-likelihoods, then as many 16-image GAN samples, one at a time,
    `gap_s` apart; the median latency of all but the first two of each. With an idle time under the gap every call
    follows a release; over it, none does."""
    logprob = _json({"images": [encode_png_b64(d) for d in digits[:64]]})
    gan = _json({"n": 16, "seed": 1})
    rows = []
    for idle in idle_times:
        with Server(store, memory_release_idle_s=idle) as srv:
            row: dict = {"idle_s": idle}
            for name, path, body in (("logprob 64 images", "/v1/pixelcnn/logprob", logprob),
                                     ("gan n=16", "/v1/gan/sample", gan)):
                ms = []
                for _ in range(requests):
                    req = urllib.request.Request(srv.base + path, data=body, headers=JSON_HEADERS)
                    t = time.perf_counter()
                    with urllib.request.urlopen(req, timeout=60) as r:
                        r.read()
                    ms.append((time.perf_counter() - t) * 1e3)
                    time.sleep(gap_s)
                row[name] = statistics.median(ms[2:])
            row["releases"] = _get(srv.base, "/v1/models")["process"]["release"]["releases"]
        print(f"  idle release after {idle:g} s, requests {gap_s:g} s apart: " + ", ".join(
            f"{k} {v:.1f} ms" for k, v in row.items() if k not in ("idle_s", "releases"))
              + f"; {row['releases']} releases", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=Path("models_store"))
    p.add_argument("--seconds", type=float, default=60.0, help="length of the load run (default 60)")
    p.add_argument("--sweep", action="store_true", help="one server per lever setting, and the lever table")
    p.add_argument("--only", type=int, nargs="*", help="with --sweep: these rows of LEVERS (0-based)")
    p.add_argument("--spaced", action="store_true", help="what a release costs the next call: spaced requests, "
                                                         "released after each (idle 1 s) or not (5 s)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    digits, _ = load_digits()
    if args.spaced:
        result: object = spaced(args.store.resolve(), digits)
    elif args.sweep:
        rows = sweep(args.store.resolve(), args.seconds, digits, args.only)
        print(sweep_table(rows))
        result = rows
    else:
        result = measure(args.store.resolve(), args.seconds, digits)
        _print("defaults", result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
