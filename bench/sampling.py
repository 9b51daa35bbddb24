"""PixelCNN sampling in-process, three ways, on the newest shipped PixelCNN version (which has all five graphs),
with the server's session options and the same uniforms:

    naive   sample_naive: the whole image through vstack + hrow for every pixel. Its cost per pixel does not
            depend on the pixel, so it is timed over a prefix of pixels and extrapolated linearly to 784.
    fast    sample_fast: vstack once per row on the rows so far, hrow on one row per pixel (full run).
    cached  sample_cached: every layer's activations cached, vstep on one row per row and hstep on one position
            per pixel (full run).

Then the service's own sampler, the IterationSampler, on each kind of graph: 64 one-image requests at once,
sharing its steps, images/s, and the same images as above.

For n = 1, 16 and 64 images: images/s, the speed-up over naive, and each step's time split between ONNX Runtime
(inside the graphs' run calls) and Python (everything else: numpy, the sampler's bookkeeping). Fast and cached
must give identical images, all 784 pixels; naive's prefix must equal both. The uniforms of the first rows come
from [0.99, 1): with plain uniforms the compared prefix would be all background and prove nothing.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from bench.limits import make_session
from service.sampler import (
    CachedSteps,
    CacheGeometry,
    IterationSampler,
    RowSteps,
    SamplerConfig,
    sample_cached,
    sample_fast,
    sample_naive,
    session_fn,
)
from service.store import declared_tensor, read_manifest

SIZES = (1, 16, 64)
PIXELS = 28 * 28


class TimedGraph:
    """A graph fn that adds up the seconds spent inside it."""

    def __init__(self, name: str, fn) -> None:
        self.name, self.fn, self.seconds, self.calls = name, fn, 0.0, 0

    def __call__(self, feeds):
        t0 = time.perf_counter()
        try:
            return self.fn(feeds)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


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


def newest_version(store: Path) -> Path:
    return max((p for p in (Path(store) / "pixelcnn").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def _timed_run(sampler, graphs: list[TimedGraph], *args) -> tuple[np.ndarray, dict]:
    """sampler(*graphs, *args) timed, with the seconds spent inside the graphs apart."""
    for g in graphs:
        g.seconds, g.calls = 0.0, 0
    t0 = time.perf_counter()
    images = sampler(*graphs, *args)
    total = time.perf_counter() - t0
    ort_s = sum(g.seconds for g in graphs)
    return images, {"seconds": total, "ort_ms_per_step": 1000.0 * ort_s / PIXELS,
                    "python_ms_per_step": 1000.0 * (total - ort_s) / PIXELS,
                    "calls": {g.name: g.calls for g in graphs}}


def sampling(store: Path, quick: bool = False, seed: int = 0) -> dict:
    folder = newest_version(store)
    manifest = read_manifest(folder)
    graph = {g: TimedGraph(g, session_fn(make_session(folder / manifest.graphs[g].file)))
             for g in ("vstack", "hrow", "vstep", "hstep")}
    cache = declared_tensor(manifest, "vstep", "vcache").shape
    geometry, side = CacheGeometry(*cache[1:4]), cache[4]
    rng = np.random.default_rng(seed)
    rows = {}
    for n in SIZES:
        labels = np.arange(n, dtype=np.int64) % 11  # every digit, and 10 = any digit
        u = rng.random((n, PIXELS))
        prefix = 4 if quick else (28 if n <= 16 else 8)  # naive at n = 64 costs seconds per pixel
        u[:, : 2 * 28] = 0.99 + 0.01 * u[:, : 2 * 28]  # see the module docstring
        _warm_up(graph, geometry, n, side)
        fast, fast_t = _timed_run(sample_fast, [graph["vstack"], graph["hrow"]], labels, u)
        cached, cached_t = _timed_run(sample_cached, [graph["vstep"], graph["hstep"]], geometry, labels, u)
        head, naive_s = naive_prefix(graph["vstack"], graph["hrow"], labels, u, prefix)
        naive_full_s = naive_s / prefix * PIXELS
        flat = head.reshape(n, -1)[:, :prefix]
        rows[n] = {
            "n": n, "naive_prefix_pixels": prefix, "naive_extrapolated_s": naive_full_s,
            "naive_images_per_s": n / naive_full_s, "fast": fast_t, "cached": cached_t,
            "fast_images_per_s": n / fast_t["seconds"], "cached_images_per_s": n / cached_t["seconds"],
            "fast_speedup_over_naive": naive_full_s / fast_t["seconds"],
            "cached_speedup_over_naive": naive_full_s / cached_t["seconds"],
            "cached_over_fast": fast_t["seconds"] / cached_t["seconds"],
            "identical_fast_cached": bool(np.array_equal(fast, cached)),
            "identical_naive_prefix": bool(np.array_equal(fast.reshape(n, -1)[:, :prefix], flat)),
            "nonzero_pixels": int(np.count_nonzero(fast)),
        }
    labels, u = np.arange(64, dtype=np.int64) % 11, rng.random((64, PIXELS))
    want = sample_cached(graph["vstep"], graph["hstep"], geometry, labels, u)
    iteration = {}
    for kind, steps in (("fast", RowSteps(graph["vstack"], graph["hrow"])),
                        ("cached", CachedSteps(graph["vstep"], graph["hstep"], geometry, side))):
        images, seconds = asyncio.run(_iteration(steps, labels, u))
        iteration[kind] = {"images_per_s": labels.size / seconds, "identical": bool(np.array_equal(images, want))}
    iteration["cached_over_fast"] = iteration["cached"]["images_per_s"] / iteration["fast"]["images_per_s"]
    return {"version": int(folder.name), "sizes": rows, "iteration": iteration}


def _warm_up(graph: dict[str, TimedGraph], geometry: CacheGeometry, n: int, side: int) -> None:
    """Every shape each sampler will feed at batch n, once, so that neither pays ONNX Runtime's first-shape costs
    inside its timing: vstack at every height, hrow, vstep and hstep at one new row or column."""
    g, p = geometry, geometry.context
    label = np.zeros(n, np.int64)
    for height in range(1, side + 1):
        graph["vstack"]({"image": np.zeros((n, 1, height, side), np.float32), "label": label})
    vfeats = graph["vstack"]({"image": np.zeros((n, 1, 1, side), np.float32), "label": label})["vfeats"]
    graph["hrow"]({"image": np.zeros((n, 1, 1, side), np.float32), "vfeats": vfeats})
    graph["vstep"]({"image": np.zeros((n, 1, p + 1, side), np.float32), "label": label, "row": label,
                    "vcache": np.zeros((n, g.depth, g.channels, p, side), np.float32)})
    graph["hstep"]({"image": np.zeros((n, 1, 1, p + 1), np.float32), "col": label, "vfeats": vfeats[..., :1],
                    "hcache": np.zeros((n, g.depth, g.channels, 1, p), np.float32)})


async def _iteration(steps, labels: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, float]:
    """One request per image, all at once, through an IterationSampler: (images, seconds)."""
    sampler = IterationSampler(steps, SamplerConfig(max_active=labels.size))
    await sampler.start()
    try:
        t0 = time.perf_counter()
        images = await asyncio.gather(*(sampler.sample(labels[i:i + 1], u[i:i + 1]) for i in range(labels.size)))
        return np.concatenate(images), time.perf_counter() - t0
    finally:
        await sampler.stop()
