"""Output: the terminal table, the JSON file, the PNG plot and the generated part of docs/benchmarks.md."""

from __future__ import annotations

import json
import math
import os
import platform
import re
from datetime import UTC, datetime
from pathlib import Path

from bench.stats import ratio

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
HEADER = ["workload", "mode", "level", "req/s", "img/s", "p50 ms", "p90 ms", "p99 ms", "errors",
          "queue wait ms/item", "compute ms/batch", "batch size", "CPU us/req server+client", "windows"]


# --------------------------------------------------------------------------------------------- machine

def machine() -> dict:
    def grep(path: str, key: str) -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.lower().startswith(key.lower()):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "unknown"

    import onnxruntime as ort

    from bench.limits import provider
    mem = grep("/proc/meminfo", "MemTotal")
    gib = f"{int(mem.split()[0]) / 2**20:.1f} GiB" if mem[:1].isdigit() else mem
    return {"cpu": grep("/proc/cpuinfo", "model name"), "cores": os.cpu_count(), "ram": gib,
            "onnxruntime": ort.__version__, "provider": provider(), "python": platform.python_version(),
            "platform": platform.platform(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}


# --------------------------------------------------------------------------------------------- tables

def _f(x: float, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.0%}"


def _cpu(cpu: dict) -> str:
    return f"{cpu['server']:,.0f} + {cpu['client']:,.0f}" if cpu.get("server") is not None else "-"


def result_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        lat, srv = r["latency"], r.get("server") or {}
        errors = {k: v for k, v in r["statuses"].items() if k != "200"}
        if r.get("unfinished"):
            errors["unfinished"] = r["unfinished"]
        level = f"c={r['level']:g}" if r["mode"] == "closed" else f"{r['level']:.2f}/s x{r['offered']}"
        windows = (f"{len(r['window_rps'])}{'' if r['stable'] else ' unstable'}" if r["mode"] == "closed"
                   else f"{r['seconds']:.0f} s")
        rows.append([r["workload"], r["mode"], level, _f(r["rps"]), _f(r["images_per_s"] or None),
                     _f(lat.get("p50_ms"), 2), _f(lat.get("p90_ms"), 2), _f(lat.get("p99_ms"), 2),
                     ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0",
                     _f(srv.get("queue_wait_ms"), 2), _f(srv.get("compute_per_batch_ms"), 2),
                     _f(srv.get("mean_batch_size"), 1), _cpu(r.get("cpu_us") or {}), windows])
    return rows


FLOOR_HEADER = ["floor", "measured", "floor", "result", "ceiling on this machine"]


def _ceiling(floor: dict) -> str:
    parts = []
    if floor.get("ceiling") is not None:
        parts.append(f"{_f(floor['ceiling'], 2)}x")
    if floor.get("framework_free") is not None:
        parts.append(f"framework-free reference {_f(floor['framework_free'], 2)}x")
    return "; ".join(parts) or "-"


_FLOOR_FORMATS = {  # what -> (the measured figure, the floor) as text
    "bool": (lambda m: "yes" if m >= 1 else "no", lambda f: "yes"),
    "ratio": (lambda m: f"{_f(m, 2)}x", lambda f: f">= {f:g}x"),
    "share": (lambda m: f"{m:.2%}" if m == m else "-", lambda f: f">= {f:.1%}"),
    "max_share": (lambda m: f"{m:+.1%}" if m == m else "-", lambda f: f"<= {f:.0%}"),
    "max_ms": (lambda m: f"{_f(m, 0)} ms", lambda f: f"<= {f:,.0f} ms"),
    "max_count": (lambda m: f"{m:,.0f}", lambda f: f"<= {f:,.0f}"),
    "max_mib": (lambda m: f"{_f(m, 0)} MiB", lambda f: f"<= {f:,.0f} MiB"),
    "max_s": (lambda m: f"{_f(m, 2)} s", lambda f: f"<= {f:g} s"),
}


def floor_rows(floors: list[dict]) -> list[list[str]]:
    rows = []
    for f in floors:
        measured, floor = _FLOOR_FORMATS.get(f["what"], _FLOOR_FORMATS["ratio"])
        rows.append([f["name"], measured(f["measured"]), floor(f["floor"]), "PASS" if f["pass"] else "FAIL",
                     _ceiling(f)])
    return rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(out)


def limit_lines(run: dict) -> list[str]:
    s = run["scenarios"]
    out = []
    if "logprob" in s:
        c = s["logprob"]["limits"]["compute"]
        sizes = ", ".join(f"{b}: {v['images_per_s']:,.0f}" for b, v in c["per_batch_size"].items())
        spin = ""
        if "spinning" in c:
            spin = (f", intra-op threads spinning {'on' if c['spinning'] else 'off'}: the better of the two; "
                    f"{c['images_per_s_other_spinning']:,.0f} with it {'off' if c['spinning'] else 'on'}")
        out.append(f"In-process ONNX Runtime on {Path(c['graph']).name} ({c['provider']}{spin}): best "
                   f"{c['images_per_s']:,.0f} images/s at batch {c['best_batch_size']} (images/s by batch size: "
                   f"{sizes}).")
    if "gan" in s:
        lim = s["gan"]["limits"]
        for key, h in lim.items():
            if key.startswith("http"):
                server = "the same server" + (f" ({key.rsplit('_', 1)[1]} workers)" if key != "http" else "")
                out.append(f"HTTP limit, GET /healthz at c=64 on {server}: {h['rps']:,.0f} requests/s, "
                           f"p50 {h['latency']['p50_ms']:.2f} ms, p99 {h['latency']['p99_ms']:.2f} ms, "
                           f"CPU per request {_cpu(h.get('cpu_us') or {})} us (server + client).")
        if c := lim.get("compute"):
            out.append(f"In-process ONNX Runtime on {Path(c['graph']).name} ({c['provider']}, one thread): best "
                       f"{c['images_per_s']:,.0f} images/s at batch {c['best_batch_size']}; at least "
                       f"{c['min_cpu_us_per_image']:,.0f} us of CPU per image. Ceiling of the GAN floor: client and "
                       f"server saturate the CPU at c=64, so a GAN request costs at least a /healthz request plus "
                       f"that compute, and GAN/healthz <= cpu(healthz) / (cpu(healthz) + compute).")
        if b := lim.get("bare"):
            g, h = b["gan"], b["healthz"]
            out.append(f"Framework-free reference (bench/bare.py: the GAN route's work with the same "
                       f"registry, batcher, sessions, draws and PNG encoding behind a bare ASGI callable, without "
                       f"routing, validation or HTTP middleware): {_f(g['rps'], 0)} requests/s at c=64, "
                       f"{_f(ratio(g['rps'], h['rps']), 2)}x its own /healthz ({_f(h['rps'], 0)}/s) and "
                       f"{_f(ratio(g['rps'], lim['http']['rps']), 2)}x the service's; CPU per request "
                       f"{_cpu(g.get('cpu_us') or {})} us.")
    if "batching" in s and (f := s["batching"]["floors"][0]).get("ceiling") is not None:
        on, off = (r["images_per_s"] for r in s["batching"]["results"])
        out.append(f"Batching at c=32: on {_f(on, 0)} images/s, off {_f(off, 0)}. Ceiling of the batching floor: "
                   f"batching on cannot beat in-process ONNX Runtime at its best batch size "
                   f"({_f(f.get('limit_images_per_s'), 0)} images/s), so on/off <= that limit / off = "
                   f"{_f(f['ceiling'], 2)}x.")
    if "sampling" in s:
        p = s["sampling"]["sampling"]
        out.append(f"PixelCNN sampling in-process, version {p['version']} (bench/sampling.py): naive extrapolated "
                   f"linearly from a prefix of pixels (its cost per pixel is constant), fast and cached in full; "
                   f"per-step times over the 784 steps of a batch. Fast and cached images identical over all 784 "
                   f"pixels, naive's over its prefix (the first rows' uniforms drawn from [0.99, 1) so it is not "
                   f"all background). Table: PixelCNN sampling. The service's IterationSampler, 64 one-image "
                   f"requests at once: {_f(p['iteration']['fast']['images_per_s'], 2)} images/s on vstack/hrow, "
                   f"{_f(p['iteration']['cached']['images_per_s'], 2)} on vstep/hstep "
                   f"({_f(p['iteration']['cached_over_fast'], 1)}x), the same images.")
    if "iteration" in s:
        it = s["iteration"]["iteration"]
        out.append(f"Iteration-level batching: one sample alone takes {it['single_latency_ms']:.0f} ms, so one at a "
                   f"time serves {1000 / it['single_latency_ms']:.2f}/s; Poisson arrivals at {it['rate_per_s']:.2f}/s "
                   f"for {it['duration_s']:.0f} s (answers awaited {it['drain_s']:.0f} s more). Shared vs sequential: "
                   f"throughput {it['throughput_ratio']:.2f}x; p50 latency sequential / shared = "
                   f"{it['p50_ratio']:.2f}x. Shared mode answered every request (sustained the rate): "
                   f"{'yes' if it['shared_sustained'] else 'no'}.")
    if "guidance" in s:
        g = s["guidance"]["guidance"]
        timings = "; ".join(f"n={r['n']} {r['unguided_s']:.2f} s against {r['guided_s']:.2f} s ({r['ratio']:.2f}x)"
                            for r in g["rows"])
        out.append(f"Guidance: labelled PixelCNN samples unguided and at the default weight {g['weight']:g}: "
                   f"{timings}.")
    if "abandon" in s:
        a = s["abandon"]["abandon"]
        stay, left = a["runs"]["stay"], a["runs"]["give_up"]
        out.append(f"Clients that give up: PixelCNN samples of n {a['n_range'][0]}..{a['n_range'][1]}, Poisson "
                   f"{a['rate_per_s']:.2f}/s for {a['duration_s']:.0f} s ({a['load']:.0%} of the sampler's "
                   f"full-width throughput), the same arrivals twice. Nobody gives up: the {stay['stayers']} who "
                   f"stay in the other run see p50 {stay['stayers_latency']['p50_ms']:,.0f} ms, p99 "
                   f"{stay['stayers_latency']['p99_ms']:,.0f} ms. {a['share']:.0%} give up after {a['give_up_s']:g} "
                   f"s ({left['gave_up']} did): those who stay see p50 {left['stayers_latency']['p50_ms']:,.0f} ms, "
                   f"p99 {left['stayers_latency']['p99_ms']:,.0f} ms; the server counted "
                   f"{left['cancelled']['sampling']:.0f} cancelled while sampling and "
                   f"{left['cancelled']['queued']:.0f} while queued, and ran {left['sequence_steps']:,.0f} "
                   f"sequence-steps against {stay['sequence_steps']:,.0f}.")
    return out


OVERLOAD_HEADER = ["route", "load", "offered/s", "requests", "200", "503", "other", "no answer (lost)", "answered",
                   "200s p50 ms", "200s p99 ms", "any answer p99 ms", "connections"]


def overload_rows(run: dict) -> list[list[str]]:
    levels = run["scenarios"].get("overload", {}).get("overload", {}).get("levels", [])
    return [[r["route"], f"{r['load']:g}x", _f(r["rate"], 0), f"{r['offered']:,}", f"{r['ok']:,}", f"{r['503']:,}",
             f"{r['other']:,}", f"{r['no_answer']:,} ({r['lost']:,})", f"{r['answered_share']:.2%}",
             _f(r["ok_p50_ms"], 0), _f(r["ok_p99_ms"], 0), _f(r["answer_p99_ms"], 0), f"{r['connections']:,}"]
            for r in levels]


PEER_HEADER = ["workload", "clients", "genserve req/s", "LitServe req/s", "throughput genserve / LitServe",
               "genserve p99 ms", "LitServe p99 ms", "p99 genserve / LitServe", "CPU us/req genserve",
               "CPU us/req LitServe"]


def peer_rows(run: dict) -> list[list[str]]:
    workloads = run["scenarios"].get("litserve", {}).get("litserve", {}).get("workloads", {})
    return [[name, f"c={w['concurrency']}", _f(w["genserve_rps"], 0), _f(w["litserve_rps"], 0),
             f"{_f(w['rps_ratio'], 2)}x", _f(w["genserve_p99_ms"], 1), _f(w["litserve_p99_ms"], 1),
             f"{_f(w['p99_ratio'], 2)}x",
             _cpu(w["genserve_cpu_us"] or {}), _cpu(w["litserve_cpu_us"] or {})] for name, w in workloads.items()]


def peer_lines(run: dict) -> list[str]:
    if not (p := run["scenarios"].get("litserve", {}).get("litserve")):
        return []
    return [f"LitServe {p['version']} on the same graphs and ONNX Runtime settings (bench/litserve_peer.py: its own "
            f"batching up to the manifest's max batch size with batch_timeout {p['batch_timeout_s'] * 1000:g} ms, "
            f"one HTTP process and one inference worker per endpoint); each server alone on the machine, the same "
            f"client and request bodies. Same images and log-likelihoods from both: "
            f"{'yes' if p['same_work'] else 'no'}. CPU per request is server + client."]


def soak_lines(run: dict) -> list[str]:
    if not (k := run["scenarios"].get("soak", {}).get("soak")):
        return []
    return [f"Soak: {', '.join(k['routes'])} in proportion to their capacities alone "
            f"({', '.join(f'{n} {c:,.0f}/s' for n, c in k['routes'].items())}) at {k['rate']:,.0f} requests/s (80% of "
            f"the mix's capacity: of {k['closed_loop']:,.0f}/s offered open-loop, the rate it sustains closed-loop at "
            f"c=64, it answered {k['capacity']:,.0f}/s 200) for "
            f"{k['seconds']:.0f} s: {k['offered']:,} requests, {k['errors']:,} not answered 200 ({k['lost']} lost); "
            f"server RSS {k['rss_start_mib']:.0f} -> {k['rss_end_mib']:.0f} MiB ({k['rss_growth']:+.1%}); p99 of the "
            f"200s by {k['window_s']:.0f} s window "
            f"{', '.join(_f(x, 0) for x in k['ok_p99_by_window_ms'])} ms (last / first {_f(k['p99_drift'], 2)}x)."]


MEMORY_HEADER = ["server RSS", "MiB", "anonymous MiB", "file-backed MiB"]
LOAD_HEADER = ["model", "version", "graph", "session MiB", "session ms", "warm-up MiB", "warm-up ms", "cold start s"]


def _mib(x: float | None) -> str:
    return _f(None if x is None else x / 2**20, 1)


def memory_rows(run: dict) -> list[list[str]]:
    if not (m := run["scenarios"].get("memory", {}).get("memory")):
        return []
    r, seconds = m["rss_mib"], m["load"]["seconds"]
    return [["before loading (interpreter, imports)", _f(r["before_loading"], 0), "-", "-"],
            ["after warm-up (ready)", _f(r["after_warmup"], 0), _f(r["after_warmup_anon"], 0),
             _f(r["after_warmup_file"], 0)],
            [f"load run ({seconds:.0f} s), peak", _f(r["load_peak"], 0), "-", "-"],
            ["at the load run's last answer", _f(r["after_load"], 0), "-", "-"],
            ["1 s after the load run", _f(r.get("after_load_settled"), 0), "-", "-"],
            [f"after {m['idle_s']:g} s idle (memory given back)", _f(r["after_idle"], 0), _f(r["after_idle_anon"], 0),
             _f(r["after_idle_file"], 0)]]


def load_rows(run: dict) -> list[list[str]]:
    """Per model version (graph "all") and graph: what its sessions and warm-up cost, from GET /v1/models."""
    if not (m := run["scenarios"].get("memory", {}).get("memory")):
        return []
    rows = []
    for name, versions in m["process"].get("models", {}).items():
        for version, v in versions.items():
            load, warm = v.get("load") or {}, v.get("warmup") or {}
            rows.append([name, version, "all (with validation)", _mib(load.get("rss_bytes")),
                         _f((load.get("seconds") or 0) * 1e3, 1), _mib(warm.get("rss_bytes")),
                         _f((warm.get("seconds") or 0) * 1e3, 1), _f(v.get("cold_start_s"), 3)])
            for graph, g in v.get("graphs", {}).items():
                sess, gw = g.get("session") or {}, g.get("warmup") or {}
                rows.append([name, version, graph, _mib(sess.get("rss_bytes")), _f((sess.get("seconds") or 0) * 1e3, 1),
                             _mib(gw.get("rss_bytes")), _f((gw.get("seconds") or 0) * 1e3, 1), "-"])
    return rows


def memory_lines(run: dict) -> list[str]:
    if not (m := run["scenarios"].get("memory", {}).get("memory")):
        return []
    start = m["process"].get("startup", {})
    load = ", ".join(f"{w} {v['images_per_s']:.1f} img/s" for w, v in m["load"].items() if w != "seconds")
    shed = sum(v["errors"].get("503", 0) for w, v in m["load"].items() if w != "seconds")
    return [f"Cold start: process start to ready {m['startup_s']:.2f} s as the client saw it; the server's own "
            f"clock: {_f(start.get('ready_s'), 2)} s, of which {_f(start.get('before_loading_s'), 2)} s before "
            f"loading began (interpreter, imports, uvicorn) and the rest loading and warming up every model.",
            f"Load run, every model at once: {load}; {shed} requests shed (503) by admission control."]


def all_results(run: dict) -> list[dict]:
    rows = []
    for name, s in run["scenarios"].items():
        rows += s.get("results", [])
        if name == "gan":
            rows += [h for key, h in s["limits"].items() if key.startswith("http")]
    return rows


SAMPLING_HEADER = ["n", "naive img/s", "fast img/s", "cached img/s", "fast / naive", "cached / naive",
                   "cached / fast", "fast ms/step ORT + Py", "cached ms/step ORT + Py", "identical"]


def sampling_rows(run: dict) -> list[list[str]]:
    """One row per number of images of the sampling scenario (naive, fast, cached), or none."""
    if "sampling" not in run["scenarios"]:
        return []
    rows = []
    for n, r in sorted(run["scenarios"]["sampling"]["sampling"]["sizes"].items(), key=lambda kv: int(kv[0])):
        split = "{ort_ms_per_step:.2f} + {python_ms_per_step:.2f}"
        rows.append([str(n), _f(r["naive_images_per_s"], 3), _f(r["fast_images_per_s"], 2),
                     _f(r["cached_images_per_s"], 2), f"{_f(r['fast_speedup_over_naive'], 1)}x",
                     f"{_f(r['cached_speedup_over_naive'], 1)}x", f"{_f(r['cached_over_fast'], 1)}x",
                     split.format(**r["fast"]), split.format(**r["cached"]),
                     "yes" if r["identical_fast_cached"] and r["identical_naive_prefix"] else "NO"])
    return rows


def all_floors(run: dict) -> list[dict]:
    return [f for s in run["scenarios"].values() for f in s.get("floors", [])]


def terminal(run: dict) -> str:
    parts = [text_table(HEADER, result_rows(all_results(run))), "", *limit_lines(run)]
    if rows := sampling_rows(run):
        parts += ["", "PixelCNN sampling", text_table(SAMPLING_HEADER, rows)]
    if rows := peer_rows(run):
        parts += ["", text_table(PEER_HEADER, rows), *peer_lines(run)]
    if rows := overload_rows(run):
        parts += ["", text_table(OVERLOAD_HEADER, rows)]
    parts += soak_lines(run)
    if rows := memory_rows(run):
        parts += ["", text_table(MEMORY_HEADER, rows), "", text_table(LOAD_HEADER, load_rows(run)), *memory_lines(run)]
    if floors := all_floors(run):
        parts += ["", text_table(FLOOR_HEADER, floor_rows(floors))]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- files

def _finite(x):
    """NaN and infinities as null, so the file is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def write_json(run: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(run), indent=2, default=str, allow_nan=False) + "\n")


def plot(run: dict, path: Path) -> bool:
    """Throughput and p50 / p99 latency against concurrency for the closed-loop sweeps; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sweeps = {n: [r for r in run["scenarios"][n]["results"] if r["workload"] == n]  # the default server's sweep
              for n in ("logprob", "gan") if n in run["scenarios"]}
    if not sweeps:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    levels = sorted({r["level"] for rows in sweeps.values() for r in rows})
    for name, rows in sweeps.items():
        color = {"logprob": "tab:blue", "gan": "tab:orange"}[name]
        c = [r["level"] for r in rows]
        ax1.plot(c, [r["images_per_s"] for r in rows], "o-", color=color, label=f"{name} images/s")
        ax2.plot(c, [r["latency"]["p50_ms"] for r in rows], "o-", color=color, label=f"{name} p50")
        ax2.plot(c, [r["latency"]["p99_ms"] for r in rows], "s--", color=color, label=f"{name} p99")
    s = run["scenarios"]
    if "logprob" in s:
        ax1.axhline(s["logprob"]["limits"]["compute"]["images_per_s"], color="tab:blue", ls=":",
                    label="logprob in-process limit")
    if "gan" in s:
        ax1.axhline(s["gan"]["limits"]["http"]["rps"], color="tab:gray", ls=":", label="GET /healthz at c=64")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [f"{c:g}" for c in levels])
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_yscale("log")  # the /healthz line sits an order of magnitude above the models
    ax1.set_ylabel("images/s (1 image per request)")
    ax2.set_ylabel("latency, ms")
    ax2.set_yscale("log")
    fig.suptitle(f"genserve on {run['machine']['cores']} cores, {run['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(run: dict, plot_rel: str | None) -> str:
    m = run["machine"]
    lines = [
        f"_Generated by `make bench` (`python -m bench`) on {m['date']}; do not edit between the markers._",
        "",
        "### Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM",
        f"- ONNX Runtime {m['onnxruntime']} ({m['provider']}), Python {m['python']}, {m['platform']}",
        f"- Client and server share this machine: the client is one asyncio process (aiohttp, keep-alive), the "
        f"server `python -m service` on a loopback port (and, for the GAN reference, `python -m "
        f"bench.bare`). Run took {run['elapsed_s']:.0f} s.",
        "- Other processes' (and the hypervisor's) share of the machine during each scenario: "
        + (", ".join(f"{n} {_pct(sc.get('cpu_elsewhere', {}).get('others_share'))}"
                     for n, sc in run["scenarios"].items()) or "-")
        + " (above a few percent the figures of that scenario are disturbed).",
        "",
        "### Floors",
        "",
        md_table(FLOOR_HEADER, floor_rows(all_floors(run))),
        "",
        "### Results",
        "",
        "Closed loop: N clients send back to back, measured in windows of "
        f"{run['windows']['seconds']:g} s after a warm-up window until two consecutive windows agree within "
        f"{run['windows']['tolerance']:.0%} (at most {run['windows']['max_windows']}); figures are from the last "
        "two windows. Open loop: Poisson arrivals, latency from the scheduled arrival; unfinished requests are "
        "counted at the cut-off (a lower bound). Server split from `/metrics` deltas over the same interval: "
        "mean queue wait per item, mean compute per batch (per sampling step for PixelCNN sampling), mean batch "
        "size (sequences per step for sampling).",
        "",
        md_table(HEADER, result_rows(all_results(run))),
        "",
        *[f"- {x}" for x in limit_lines(run) + soak_lines(run)],
    ]
    if rows := sampling_rows(run):
        lines += ["", "### PixelCNN sampling", "", md_table(SAMPLING_HEADER, rows)]
    if rows := peer_rows(run):
        lines += ["", "### genserve and LitServe", "", *peer_lines(run), "", md_table(PEER_HEADER, rows)]
    if rows := overload_rows(run):
        lines += ["", "### Overload", "",
                  "Open loop from several generator processes of raw asyncio HTTP (bench/openloop.py): "
                  "Poisson arrivals at 1x, 2x and 3x the route's capacity measured closed-loop just before; a "
                  "request finding no idle connection opens one. Latency from the scheduled arrival. No answer: "
                  "refused connections, and lost requests (sent, then the connection closed or the drain limit "
                  "passed without an answer).", "", md_table(OVERLOAD_HEADER, rows)]
    if rows := memory_rows(run):
        lines += ["", "### Memory and cold start", "",
                  "The server's VmRSS (/proc) on the shipped store with default settings (bench/memory.py), and what "
                  "each model version and graph cost to load and warm up (GET /v1/models, `process`).", "",
                  md_table(MEMORY_HEADER, rows), "", md_table(LOAD_HEADER, load_rows(run)), "",
                  *[f"- {x}" for x in memory_lines(run)]]
    if plot_rel:
        lines += ["", f"![throughput and latency against concurrency]({plot_rel})"]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """`text` with everything between the bench markers replaced by `block`; markers appended when absent.
    Text outside the markers is kept byte for byte."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    new = f"{BEGIN}\n{block.strip()}\n{END}"
    if pattern.search(text):
        return pattern.sub(lambda _: new, text, count=1)
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + new + "\n"


SKELETON = "# Benchmarks\n\n## Tuning notes\n\n\n## Latest run\n\n"


def update_doc(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else SKELETON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(replace_block(text, block))
