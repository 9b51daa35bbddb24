"""What the hardware allows, measured in this process with the server's own session options.

compute_limit: ONNX Runtime called directly on a graph file (no HTTP, no queue, no batcher) at a sweep of
batch sizes; the best images/s is the ceiling any server on this machine can reach for that graph.

PixelCNN sampling in-process is bench/sampling.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.cpu import own_seconds
from service.runtime import resolve_providers, session_factory
from service.settings import Settings


def make_session(path: Path, **overrides):
    """A session with exactly the options the server uses (Settings from the same GENSERVE_* environment),
    but for `overrides` (e.g. intra_op_threads=1)."""
    return session_factory(Settings(**overrides))(Path(path))


def provider() -> str:
    return resolve_providers(Settings().providers)[0]


def compute_limit(graph: Path, feeds_for, batch_sizes: list[int], seconds: float = 1.0, rounds: int = 5,
                  **overrides) -> dict:
    """images/s of back-to-back `sess.run` calls at each batch size: `rounds` rounds of about seconds / rounds,
    each a sustained rate (comparable with a server's throughput); the best round counts, so a moment of
    interference from another process does not lower the limit. Also the CPU time per image (this process's,
    all ONNX Runtime threads included): the least any server pays for the graph's compute."""
    sess = make_session(graph, **overrides)
    names = [o.name for o in sess.get_outputs()]
    per_size = {}
    for b in batch_sizes:
        feeds = feeds_for(b)
        sess.run(names, feeds)  # warm-up: allocations, kernel choice
        rates, cpus = [], []
        for _ in range(rounds):
            runs, start, cpu0 = 0, time.perf_counter(), own_seconds()
            while runs < 2 or time.perf_counter() < start + seconds / rounds:
                sess.run(names, feeds)
                runs += 1
            rates.append(b * runs / (time.perf_counter() - start))
            cpus.append((own_seconds() - cpu0) / (b * runs))
        per_size[b] = {"images_per_s": max(rates), "median_images_per_s": float(np.median(rates)),
                       "batch_ms": b / max(rates) * 1000.0, "cpu_us_per_image": 1e6 * float(np.median(cpus))}
    top = max(per_size, key=lambda b: per_size[b]["images_per_s"])
    return {"graph": str(graph), "provider": sess.get_providers()[0], "per_batch_size": per_size,
            "best_batch_size": top, "images_per_s": per_size[top]["images_per_s"],
            "min_cpu_us_per_image": min(v["cpu_us_per_image"] for v in per_size.values())}
