"""What the hardware allows, measured in this process with the server's own session options.

compute_limit: ONNX Runtime called directly on a graph file (no HTTP, no queue, no batcher) at a sweep of
batch sizes; the best images/s is the ceiling any server on this machine can reach for that graph.

sampling: PixelCNN `sample_fast` against `sample_naive` on the shipped vstack / hrow graphs with the same
uniforms. Naive costs a full forward pass per pixel whatever the pixel, so it is timed on a prefix of pixels
and extrapolated linearly to 784; fast runs in full. The prefix of naive's images is compared with fast's
(its uniforms taken from [0.99, 1) so that it is not all background).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.cpu import own_seconds
from service.runtime import resolve_providers, session_factory
from service.sampler import sample_fast, sample_naive, session_fn
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


class _Stop(Exception):
    pass


def naive_prefix(vstack, hrow, labels: np.ndarray, u: np.ndarray, pixels: int) -> tuple[np.ndarray, float]:
    """Run the real `sample_naive` until it has drawn `pixels` pixels; returns (images so far, seconds).

    Pixel t's vstack call receives the image with pixels 0..t-1 drawn, so the call for pixel `pixels` is
    stopped before it runs and its input is the prefix."""
    calls, captured = 0, {}

    def counting_vstack(feeds):
        nonlocal calls
        if calls == pixels:
            captured["image"] = feeds["image"][:, 0].copy()
            raise _Stop
        calls += 1
        return vstack(feeds)

    t0 = time.perf_counter()
    try:
        sample_naive(counting_vstack, hrow, labels, u)
    except _Stop:
        pass
    return captured["image"].astype(np.uint8), time.perf_counter() - t0


def sampling(store: Path, n: int = 16, prefix_pixels: int = 56, seed: int = 0) -> dict:
    folder = max((p for p in (Path(store) / "pixelcnn").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    vstack = session_fn(make_session(folder / "vstack.onnx"))
    hrow = session_fn(make_session(folder / "hrow.onnx"))
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 10
    u = rng.random((n, 784))
    # the top rows of a digit are background: with plain uniforms the compared prefix is all zeros and the
    # comparison proves nothing, so its uniforms come from [0.99, 1) (upper tail: some pixels are drawn non-zero).
    # Both samplers get this same array; timing does not depend on the values.
    u[:, :prefix_pixels] = 0.99 + 0.01 * u[:, :prefix_pixels]
    sample_fast(vstack, hrow, labels[:1], u[:1])  # warm-up
    t0 = time.perf_counter()
    fast = sample_fast(vstack, hrow, labels, u)
    fast_s = time.perf_counter() - t0
    prefix, naive_prefix_s = naive_prefix(vstack, hrow, labels, u, prefix_pixels)
    per_pixel = naive_prefix_s / prefix_pixels
    naive_s = per_pixel * 784
    k = prefix_pixels
    compared = prefix.reshape(n, -1)[:, :k]
    identical = bool(np.array_equal(fast.reshape(n, -1)[:, :k], compared))
    return {"samples": n, "fast_s": fast_s, "naive_prefix_pixels": k, "naive_prefix_s": naive_prefix_s,
            "compared_nonzero_pixels": int(np.count_nonzero(compared)),
            "naive_per_pixel_ms": per_pixel * 1000.0, "naive_extrapolated_s": naive_s,
            "speedup": naive_s / fast_s, "identical_prefix": identical}
