"""ONNX Runtime's CPU memory arena and memory-pattern planning: throughput and peak memory per setting.

    python -m bench.arena [--store models_store] [--rounds 2]

Each setting runs in a fresh subprocess (peak RSS is per process), on every served graph with a cycle of
varying batch sizes, as a server sees them. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

SIZES = [1, 3, 8, 17, 32, 64, 5, 12] * 6  # a mix of batch sizes, repeated
SETTINGS = [(True, True), (True, False), (False, True), (False, False)]  # (arena, memory pattern)


def graphs(store: Path) -> list[tuple[str, Path, Callable[[int], dict]]]:
    rng = np.random.default_rng(0)

    def image(b: int) -> np.ndarray:
        return rng.integers(0, 256, (b, 1, 28, 28)).astype(np.float32)

    def latest(model: str) -> Path:
        return max((p for p in (store / model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))

    return [
        ("pixelcnn logprob", latest("pixelcnn") / "logprob.onnx",
         lambda b: {"image": image(b), "label": np.full(b, 10, np.int64)}),
        ("gan generator", latest("gan") / "generator.onnx",
         lambda b: {"z": rng.standard_normal((b, 64)).astype(np.float32), "label": np.arange(b) % 10}),
        ("vae encoder", latest("vae") / "encoder.onnx", lambda b: {"image": image(b)}),
    ]


def measure(store: Path, arena: bool, pattern: bool) -> dict:
    """In this process: images/s per graph over SIZES, and the peak RSS afterwards."""
    import onnxruntime as ort

    from service.runtime import resolve_providers, session_options
    from service.settings import Settings

    settings = Settings()  # the server's options (same GENSERVE_* environment), then the two under test
    out = {}
    for name, path, feeds in graphs(store):
        so = session_options(settings)
        so.enable_cpu_mem_arena, so.enable_mem_pattern = arena, pattern
        sess = ort.InferenceSession(str(path), so, providers=resolve_providers(settings.providers))
        batches = [feeds(b) for b in SIZES]
        sess.run(None, batches[0])
        start, images = time.perf_counter(), 0
        for f in batches:
            sess.run(None, f)
            images += len(next(iter(f.values())))
        out[name] = images / (time.perf_counter() - start)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.arena", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=Path("models_store"))
    p.add_argument("--rounds", type=int, default=2, help="runs per setting; the best throughput counts")
    p.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.store, *map(bool, args.child))))
        return 0
    rows = []
    for arena, pattern in SETTINGS:
        runs = []
        for _ in range(args.rounds):
            cmd = [sys.executable, "-m", "bench.arena", "--store", str(args.store),
                   "--child", str(int(arena)), str(int(pattern))]
            runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        best = {k: max(r[k] for r in runs) for k in runs[0] if k != "peak_rss_mib"}
        rows.append((arena, pattern, best, max(r["peak_rss_mib"] for r in runs)))
    names = list(rows[0][2])
    print("| memory arena | memory pattern | " + " | ".join(f"{n} img/s" for n in names) + " | peak RSS MiB |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for arena, pattern, best, rss in rows:
        print(f"| {'on' if arena else 'off'} | {'on' if pattern else 'off'} | "
              + " | ".join(f"{best[n]:,.0f}" for n in names) + f" | {rss:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
