"""Loaded models: ONNX Runtime sessions, one batcher per graph, warm-up, and the registry the routes use.

Nothing here knows HTTP; routes ask the registry for a model version and submit arrays to it.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from service import memory
from service.batcher import Batcher, BatchingConfig
from service.memory import Activity, Cost, measured
from service.metrics import Metrics
from service.sampler import CachedSteps, CacheGeometry, IterationSampler, RowSteps, SamplerConfig, session_fn
from service.settings import LatestVersions, Settings, SpecificVersions, VersionPolicy
from service.store import (
    LoadedVersion,
    Scan,
    declared_tensor,
    is_dir,
    load_versions,
    printable,
    refuse,
    scan_store,
)

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_NP_DTYPES = {"float32": np.float32, "int64": np.int64, "uint8": np.uint8}


class ModelNotFound(LookupError):
    pass


class ResourceExhausted(RuntimeError):
    """ONNX Runtime could not allocate memory for a call: a capacity problem of the moment (the API answers
    503 + Retry-After), not a bad request and not a bug."""


# How ONNX Runtime words an allocation that failed: its arena, cuBLAS or cuDNN handles, CUDA itself. Seen on an
# H100 when 16 workers' sessions filled it.
_OOM_MARKERS = ("Failed to allocate memory", "out of memory", "CUBLAS failure 3", "CUDNN_STATUS_ALLOC_FAILED",
                "the resource allocation failed")


def from_onnxruntime(exc: BaseException) -> bool:
    """Whether ONNX Runtime raised `exc` (its pybind exception types live in onnxruntime.capi)."""
    return type(exc).__module__.startswith("onnxruntime")


def out_of_memory_guard(predict: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]):
    """predict, with ONNX Runtime's allocation failures raised as ResourceExhausted (and logged)."""
    def guarded(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return predict(inputs)
        except Exception as exc:
            if from_onnxruntime(exc) and any(m in str(exc) for m in _OOM_MARKERS):
                log.error("ONNX Runtime ran out of memory: %s", str(exc).splitlines()[0][:300])
                raise ResourceExhausted(str(exc).splitlines()[0][:300]) from exc
            raise
    return guarded


def resolve_providers(setting: str) -> list[str]:
    """'auto' asks for CUDA only where the CUDA provider is built in and a GPU device node exists."""
    import onnxruntime as ort
    available = ort.get_available_providers()
    s = setting.strip().lower()
    if s == "cpu":
        return [CPU]
    if s == "cuda":
        return [CUDA, CPU]
    if s == "auto":
        has_gpu = Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists()
        return [CUDA, CPU] if CUDA in available and has_gpu else [CPU]
    wanted = [p.strip() for p in setting.split(",") if p.strip()]
    return [p for p in wanted if p in available] or [CPU]


def session_options(settings: Settings):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[settings.ort_graph_optimization]
    so.intra_op_num_threads = settings.ort_threads()
    so.inter_op_num_threads = settings.inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning intra-op threads poll for work between kernels: lower latency for one call, but on a CPU
    # shared with the event loop (and other workers) the polling takes cores the request path needs.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.ort_spinning else "0")
    so.enable_cpu_mem_arena = settings.ort_arena != "off"
    so.log_severity_level = 3  # errors only: the CUDA provider's fallback chatter is reported by us
    return so


_SAME_AS_REQUESTED = 1  # onnxruntime ArenaExtendStrategy.kSameAsRequested (0 is kNextPowerOfTwo)
_shared_arena: bool | None = None
_shared_arena_lock = threading.Lock()


def shared_cpu_arena() -> bool:
    """Register one CPU memory arena with ONNX Runtime's environment, once per process; whether there is one.

    Sessions opt in with `session.use_env_allocators`. ONNX Runtime calls run on at most
    `GENSERVE_WORKER_THREADS` threads at a time, so one arena shared by every session holds what those calls
    need together, where an arena per session would keep each session's own largest call. It grows by what a
    call asks (kSameAsRequested) rather than by doubling, and every region it holds can be freed when unused
    (`shrink_arenas`). The first registration's configuration holds for the life of the process."""
    global _shared_arena
    with _shared_arena_lock:
        if _shared_arena is None:
            import onnxruntime as ort
            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": _SAME_AS_REQUESTED}))
                _shared_arena = True
            except Exception:  # an ONNX Runtime without it: each session keeps its own arena
                log.warning("ONNX Runtime: no shared CPU arena; each session keeps its own", exc_info=True)
                _shared_arena = False
        return _shared_arena


@functools.lru_cache(maxsize=1)
def _shrink_options():
    import onnxruntime as ort
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def session_factory(settings: Settings):
    import onnxruntime as ort
    providers = resolve_providers(settings.providers)

    # cuDNN's exhaustive algorithm search (the CUDA provider's default) benchmarks every convolution again
    # for each new input shape. A server sees a new shape for every batch size, and PixelCNN sampling one for
    # every row, so a server kept paying the search (docs/benchmarks.md, CUDA run). The heuristic picks at once.
    # kSameAsRequested: grow the device arena by what a call needs, not by doubling, since every bucket session
    # of every worker has an arena of its own on the one GPU.
    options = {CUDA: {"cudnn_conv_algo_search": settings.cuda_conv_algo_search,
                      "arena_extend_strategy": "kSameAsRequested"}}
    with_options = [(p, options[p]) if p in options else p for p in providers]

    so = session_options(settings)  # one SessionOptions serves every session (it reads the cgroup quota once)
    if providers != [CPU]:  # GENSERVE_ORT_ARENA is the CPU provider's: with CUDA, ONNX Runtime's own host arena
        so.enable_cpu_mem_arena = True
    elif settings.ort_arena == "shared" and shared_cpu_arena():
        so.add_session_config_entry("session.use_env_allocators", "1")

    def make(path: Path):
        return ort.InferenceSession(str(path), so, providers=with_options)
    return make


def bucket_sizes(buckets: list[int], max_batch_size: int) -> list[int]:
    """The batch sizes a fixed-shape graph runs at: the configured buckets below the max, and the max."""
    return sorted({b for b in buckets if 1 <= b < max_batch_size} | {max_batch_size})


class PaddedPredict:
    """Fixed shapes for the CUDA provider: one session per batch-size bucket, each batch padded up to the
    smallest bucket that holds it (by repeating its last item) and the padding cut off the outputs.

    ONNX Runtime's CUDA convolutions rebuild their state whenever the input shape differs from the previous
    call's, at many times the cost of the call itself (docs/benchmarks.md, CUDA run), and a batcher sees a new
    batch size at nearly every call. A session that only ever sees one shape never pays it; padding 3 images to
    8 costs almost nothing on a GPU."""

    def __init__(self, sessions: dict[int, Any]):
        self.buckets = sorted(sessions)
        self.fns = {b: session_fn(sess) for b, sess in sessions.items()}

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(inputs.values())))
        bucket = next((b for b in self.buckets if b >= n), None)
        if bucket is None:  # the batcher never hands over more than max_batch_size items
            raise ValueError(f"batch of {n} exceeds the largest bucket {self.buckets[-1]}")
        if bucket == n:
            return self.fns[bucket](inputs)
        padded = {k: np.concatenate([v, np.repeat(v[-1:], bucket - n, axis=0)]) for k, v in inputs.items()}
        return {k: v[:n] for k, v in self.fns[bucket](padded).items()}


def sampler_steps(lv: LoadedVersion, graph_fn: Callable[[str], Callable]) -> RowSteps | CachedSteps:
    """How a PixelCNN version's sampler steps: on its activation-cached step graphs where it has them (their
    caches shaped as its manifest declares, and checked to compute what vstack and hrow do), else on vstack and
    hrow. `graph_fn(name)`: what calling that graph is, as the version runs it."""
    graph = {g: graph_fn(g) for g in ("vstack", "hrow", "vstep", "hstep") if g in lv.sessions}
    if "vstep" in graph and "hstep" in graph:
        cache = declared_tensor(lv.manifest, "vstep", "vcache").shape  # (B, depth, channels, context, W)
        steps = CachedSteps(graph["vstep"], graph["hstep"], CacheGeometry(*cache[1:4]), cache[4])
        steps.check_against(graph["vstack"], graph["hrow"])
        return steps
    return RowSteps(graph["vstack"], graph["hrow"])


class SlicedPredict:
    """A batch run in slices of at most `images` images' worth of pixels per ONNX Runtime call, the outputs copied
    into one array per output as each slice returns (CPU provider).

    A call's activations grow with its batch: the PixelCNN's logprob graph takes 3.6 MiB per image, so a batch of
    64 needs 230 MiB at once (which an arena then keeps); in slices of 8 it needs 30. Slicing costs no
    throughput there: the graph is compute-bound from batch 1 (README, Memory). An input with a dynamic axis
    besides the batch (`rows_axis` of input `rows_input`, the rows of an image so far) counts each item as
    rows / image_size of an image, so a call on one row takes image_size times as many items."""

    def __init__(self, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], images: int, image_size: int,
                 rows: tuple[str, int] | None = None):
        if images < 1 or image_size < 1:
            raise ValueError("images and image_size must be >= 1")
        self.fn, self.images, self.image_size, self.rows = fn, images, image_size, rows

    def per_call(self, inputs: dict[str, np.ndarray]) -> int:
        """Items one call takes for inputs of this shape."""
        if self.rows is None:
            return self.images
        name, axis = self.rows
        rows = inputs[name].shape[axis] if name in inputs and inputs[name].ndim > axis else self.image_size
        return max(1, self.images * self.image_size // max(1, rows))

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(inputs.values())))
        per = self.per_call(inputs)
        if n <= per:
            return self.fn(inputs)
        out: dict[str, np.ndarray] = {}
        for i in range(0, n, per):
            part = self.fn({k: v[i:i + per] for k, v in inputs.items()})
            for k, v in part.items():
                if len(v) != min(per, n - i):
                    raise ValueError(f"output {k!r} has {len(v)} items for a slice of {min(per, n - i)}: its first "
                                     "axis is not the batch, so this graph cannot be sliced")
                if k not in out:
                    out[k] = np.empty((n, *v.shape[1:]), v.dtype)
                out[k][i:i + len(v)] = v
            del part  # ONNX Runtime's output buffers go back to its arena before the next slice runs
        return out


def rows_axis(spec) -> tuple[str, int] | None:
    """(input name, axis) of a graph's first dynamic axis besides the batch (the PixelCNN step graphs' rows so
    far), or None when its inputs have fixed shapes past the batch."""
    for t in spec.inputs:
        for axis, d in enumerate(t.shape):
            if axis > 0 and d is None:
                return t.name, axis
    return None


class ModelVersion:
    """One loaded version: its manifest, sessions, a batcher per graph, and the PixelCNN sampler.

    Every graph has a batcher (the /v1 routes and the /v2 raw tensor access share them); the sampler calls the
    PixelCNN's vstack/hrow sessions itself, so only /v2 requests go through those two batchers."""

    def __init__(self, lv: LoadedVersion, settings: Settings, executor: ThreadPoolExecutor, metrics: Metrics,
                 make_session: Callable[[Path], Any] | None = None, activity: Activity | None = None,
                 load_cost: Cost | None = None, session_costs: Mapping[str, Cost] | None = None):
        m = lv.manifest
        self.loaded, self.manifest, self.name, self.version, self.family = lv, m, m.name, m.version, m.family
        self.provider = lv.providers[0] if lv.providers else CPU
        # What loading cost: validating the folder and opening its sessions (and each graph's session), warm-up
        self.load_cost, self.session_costs = load_cost, dict(session_costs or {})
        self.warmup_costs: dict[str, Cost] = {}
        self.warmup_batch_sizes = list(settings.warmup_batch_sizes)
        self._shrink_probes: dict[str, Callable[[], Any]] = {}
        track = activity.track if activity is not None else (lambda fn: fn)
        mbs, delay_ms = settings.batching_for(m.name, m.batching.max_batch_size, m.batching.max_delay_ms)
        self.batching = BatchingConfig(max_batch_size=mbs, max_delay_s=delay_ms / 1000.0,
                                       max_queue_items=settings.max_queue_items, timeout_s=settings.request_timeout_s,
                                       max_queue_wait_s=settings.max_queue_wait_s)
        # What each batcher calls: the session, or on CUDA one session per batch-size bucket.
        self.predict: dict[str, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]] = {}
        sizes = bucket_sizes(settings.cuda_buckets, mbs)
        for g, sess in lv.sessions.items():
            self.predict[g] = self._sliced(g, session_fn(sess), settings)
            if self.provider == CUDA and make_session is not None and settings.cuda_buckets:
                try:
                    extra = {b: make_session(lv.path / m.graphs[g].file) for b in sizes[1:]}
                except Exception:  # e.g. the GPU is full: serve with one session (shape changes cost time)
                    log.warning("%s v%d: no bucket sessions for graph %s; one session serves every batch size",
                                m.name, m.version, g, exc_info=True)
                    continue
                self.predict[g] = PaddedPredict({sizes[0]: sess, **extra})
        self.batchers = {g: Batcher(f"{m.name}/{m.version}/{g}", out_of_memory_guard(track(self.predict[g])),
                                    self.batching, executor, metrics.observer(m.name, m.version, g),
                                    concurrency=settings.batch_concurrency)
                         for g in lv.sessions}
        self.sampler: IterationSampler | None = None
        if m.family == "pixelcnn":
            def graph(g: str) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
                return out_of_memory_guard(track(self.predict[g] if self.provider == CPU else
                                                 session_fn(lv.sessions[g])))

            geometry = {k: int(m.model[k]) for k in ("image_size", "num_classes") if k in m.model}
            self.sampler = IterationSampler(
                sampler_steps(lv, graph),
                SamplerConfig(max_active=settings.sampler_max_active, max_queue=settings.sampler_max_queue,
                              timeout_s=settings.sample_timeout_s, **geometry),
                executor=executor, observer=metrics.sampler_observer(m.name, m.version))

    def _sliced(self, graph: str, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                settings: Settings) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """fn in slices (SlicedPredict) where GENSERVE_MAX_CALL_IMAGES names the graph and the version runs on the
        CPU; on CUDA large batches are what the device is for."""
        images = settings.max_call_images.get(graph)
        if not images or self.provider != CPU:
            return fn
        rows = rows_axis(self.manifest.graphs[graph])
        size = self.manifest.model.get("image_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            if rows is not None:  # an item's share of an image is unknown: whole calls
                log.warning("%s v%d: graph %s is not sliced: manifest.model.image_size is %r", self.name,
                            self.version, graph, size)
                return fn
            size = 1
        return SlicedPredict(fn, images, size, rows)

    async def start(self) -> None:
        for b in self.batchers.values():
            await b.start()
        if self.sampler is not None:
            await self.sampler.start()

    async def stop(self) -> None:
        """Finish everything accepted, then stop."""
        for b in self.batchers.values():
            await b.stop()
        if self.sampler is not None:
            await self.sampler.stop()

    async def run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return await self.batchers[graph].submit(inputs)

    def warmup(self) -> float:
        """Run every graph once on zeros at each of GENSERVE_WARMUP_BATCH_SIZES (capped at the max batch size; at
        every bucket size where shapes are fixed), so that a graph that loads but cannot run is refused and the
        first request pays no first-run cost. Returns seconds; each graph's cost is in `warmup_costs`.

        It calls the predict functions directly, not the batchers: it runs on the thread that builds the
        registry, off the event loop, before anything is served."""
        t0 = time.perf_counter()
        for gname in self.manifest.graphs:
            def run(g: str = gname) -> None:
                for b in self.warm_sizes(g):
                    self.predict[g](self.zeros(g, b))
            _, self.warmup_costs[gname] = measured(run)
        return time.perf_counter() - t0

    def load_report(self) -> dict[str, Any]:
        """What this version cost to load (validating its folder, opening its sessions) and to warm up, in seconds
        and RSS, in all and per graph; cold_start_s is the two together."""
        warm = list(self.warmup_costs.values())
        total = Cost(sum(c.seconds for c in warm), None if any(c.rss_bytes is None for c in warm)
                     else sum(c.rss_bytes for c in warm)) if warm else None
        cold = sum(c.seconds for c in (self.load_cost, total) if c is not None)
        return {"cold_start_s": round(cold, 4),
                "load": self.load_cost.as_dict() if self.load_cost else None,
                "warmup": total.as_dict() if total else None,
                "graphs": {g: {"session": self.session_costs[g].as_dict() if g in self.session_costs else None,
                               "warmup": self.warmup_costs[g].as_dict() if g in self.warmup_costs else None}
                           for g in self.manifest.graphs}}

    def zeros(self, graph: str, batch: int) -> dict[str, np.ndarray]:
        """Zero inputs for one graph at `batch` items. A dynamic axis besides the batch (vstack's and hrow's rows so
        far) gets its largest size: the image size, from the manifest. The PixelCNN's vstep and hstep, whose axes
        are tied to each other, get what the sampler feeds them at every step: one new row, one new pixel."""
        if self.sampler is not None and isinstance(self.sampler.stepper, CachedSteps):
            _, layers, width, *_ = declared_tensor(self.manifest, "hstep", "vfeats").shape  # (B, L, 2C, 1, n)
            row, pixel = self.sampler.stepper.zeros(batch, layers, width)
            if graph in ("vstep", "hstep"):
                return row if graph == "vstep" else pixel
        feeds = {}
        for t in self.manifest.graphs[graph].inputs:
            shape = [batch if i == 0 else (self.image_size() if d is None else d) for i, d in enumerate(t.shape)]
            feeds[t.name] = np.zeros(shape, _NP_DTYPES[t.dtype])
        return feeds

    def image_size(self) -> int:
        """The side of the square images the model works on, as training recorded it in the manifest."""
        size = self.manifest.model.get("image_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"manifest.model.image_size is {size!r}, not an image size: a graph has a dynamic "
                             "axis besides the batch, sized by it")
        return size

    def warm_sizes(self, graph: str) -> list[int]:
        """The batch sizes warm-up runs a graph at: every bucket where shapes are fixed, else
        GENSERVE_WARMUP_BATCH_SIZES capped at the max batch size."""
        predict = self.predict[graph]
        if isinstance(predict, PaddedPredict):
            return predict.buckets
        return sorted({min(b, self.batching.max_batch_size) for b in self.warmup_batch_sizes})

    def shrink_arena(self, graphs: int | None = None) -> int:
        """Free what ONNX Runtime's CPU arena holds unused: a batch-1 call of a graph with the run option
        `memory.enable_memory_arena_shrinkage`, after which the arena frees every region with nothing allocated
        in it (all of them, as it grows by what each call asks). With a shared arena one graph's call frees it
        for every session; with an arena per session each graph needs its own. `graphs`: how many (None: all).
        The probe's outputs are bound to buffers of its own, so no output pins a region. Returns the calls made."""
        import onnxruntime as ort
        names = list(self.loaded.sessions)[:graphs]
        for g in names:
            if g not in self._shrink_probes:
                sess, feeds = self.loaded.sessions[g], self.zeros(g, 1)
                outputs = sess.run(None, feeds)  # their shapes at batch 1
                binding = sess.io_binding()
                for k, v in feeds.items():
                    binding.bind_cpu_input(k, v)
                bound = [ort.OrtValue.ortvalue_from_numpy(np.empty_like(arr)) for arr in outputs]
                for spec, value in zip(sess.get_outputs(), bound, strict=True):
                    binding.bind_ortvalue_output(spec.name, value)
                keep = (feeds, bound)  # the bound buffers live as long as the probe

                def probe(sess=sess, binding=binding, keep=keep) -> None:
                    sess.run_with_iobinding(binding, _shrink_options())
                self._shrink_probes[g] = probe
            self._shrink_probes[g]()
        return len(names)

    def describe(self) -> dict:
        m = self.manifest
        return {
            "name": m.name, "version": m.version, "family": m.family, "description": m.description,
            "provider": self.provider, "providers": self.loaded.providers,
            "batching": {"max_batch_size": self.batching.max_batch_size,
                         "max_delay_ms": self.batching.max_delay_s * 1000.0,
                         "max_queue_items": self.batching.max_queue_items},
            "graphs": {g: {"inputs": [t.model_dump() for t in s.inputs], "outputs": [t.model_dump() for t in s.outputs]}
                       for g, s in m.graphs.items()},
            "model": m.model, "dataset": m.dataset, "metrics": m.metrics,
            "attributes": {k: {"description": a.description, "unit": a.unit, "mean": a.mean, "std": a.std}
                           for k, a in m.attributes.items()},
        }


def admitted(version_dirs: list[Path], policies: Mapping[str, VersionPolicy]) -> list[Path]:
    """The version folders (`<store>/<model>/<version>`) that their model's version policy lets serve, Triton's
    shapes: "all", {"latest": n} (the n highest version numbers found), {"specific": [...]}."""
    by_model: dict[str, list[Path]] = {}
    for d in version_dirs:
        by_model.setdefault(d.parent.name, []).append(d)
    out = []
    for model, dirs in by_model.items():
        policy = policies.get(model, "all")
        dirs = sorted(dirs, key=lambda d: int(d.name))
        if isinstance(policy, LatestVersions):
            dirs = dirs[-policy.latest:]
        elif isinstance(policy, SpecificVersions):
            dirs = [d for d in dirs if int(d.name) in policy.specific]
        out += dirs
    return out


Split = tuple[tuple[int, float], ...]  # (version, weight) pairs, by version


def checked_split(name: str, weights: Mapping[int, float], versions: Mapping[int, Any]) -> Split:
    """A traffic split as the registry keeps it, or ValueError naming what is wrong: every version loaded,
    weights finite and >= 0, not all 0. Empty: no split (the highest version)."""
    for v, w in weights.items():
        if v not in versions:
            raise ValueError(f"version {v} of {name} is not loaded (loaded: {sorted(versions)})")
        if not (w >= 0 and w != float("inf")):
            raise ValueError(f"the weight of version {v} must be a finite number >= 0, got {w}")
    if weights and not any(weights.values()):
        raise ValueError("the weights are all 0")
    return tuple(sorted((int(v), float(w)) for v, w in weights.items()))


def _frozen(mapping: Mapping | None = None) -> MappingProxyType:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Snapshot:
    """What the registry serves, published whole in one assignment: a reader sees the empty set of before
    loading or the full one after it, never one being built. Its mappings and sequences are read-only."""
    models: Mapping[str, Mapping[int, ModelVersion]] = field(default_factory=_frozen)
    refused: Mapping[str, tuple[str, ...]] = field(default_factory=_frozen)  # printable path -> its problems
    required: tuple[str, ...] = ()           # models that must serve for the service to be ready
    missing: Mapping[str, tuple[str, ...]] = field(default_factory=_frozen)  # required model -> why none serves
    ready: bool = False                      # loading is over: requests are accepted
    traffic: Mapping[str, Split] = field(default_factory=_frozen)  # model -> its traffic split
    unloaded: frozenset[str] = frozenset()   # models unloaded through the repository API: not "missing"


@dataclass
class _Build:
    """What load() made on its thread and start() has yet to start and publish."""
    versions: list[ModelVersion]
    refused: dict[str, list[str]]
    required: list[str]


class Registry:
    """Every valid version in the store; the default version of a model is its highest valid one.

    Loading has two steps. load() builds every version (ONNX Runtime sessions, batchers, warm-up) on the thread
    that calls it, off the event loop, since that is the slow part. start(), on the event loop, starts their
    batchers and samplers and publishes the whole set as one immutable Snapshot; the readers (`models`,
    `refused`, `required`, `missing`, `ready`) read the current one.

    `ready` means loading is over (requests are accepted); the readiness probes also want every required model
    serving (`fully_ready`), as Triton's strict readiness does: a model whose every version was refused leaves
    the service up for the others, but not ready, with `missing` saying why."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.snapshot = Snapshot()
        self.stopping = False  # set by stop(): not ready any more, and not because models are loading
        self._built: _Build | None = None
        self._draining: set[asyncio.Task] = set()  # retired versions waiting out their drain grace
        threads = settings.worker_threads
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ort")
        self.activity = Activity()  # every ONNX Runtime call of the batchers and samplers
        self.releases = 0           # memory releases done (release_memory)
        self._releasing: asyncio.Task | None = None
        self.startup: dict[str, float | int | None] = {}  # process start to loading and to ready (app.py)
        log.info("ONNX Runtime: %d calling threads, %d intra-op threads per session%s", threads,
                 settings.ort_threads(), "" if settings.intra_op_threads else " (cores / workers)")

    @property
    def models(self) -> Mapping[str, Mapping[int, ModelVersion]]:
        return self.snapshot.models

    @property
    def refused(self) -> Mapping[str, tuple[str, ...]]:
        return self.snapshot.refused

    @property
    def required(self) -> tuple[str, ...]:
        return self.snapshot.required

    @property
    def missing(self) -> Mapping[str, tuple[str, ...]]:
        return self.snapshot.missing

    @property
    def ready(self) -> bool:
        return self.snapshot.ready

    @ready.setter
    def ready(self, value: bool) -> None:
        """Marks the published set ready or not (stop() does, and tests); the set itself stays as it is."""
        self.snapshot = replace(self.snapshot, ready=value)

    def load(self) -> None:
        """Build every valid version the version policy admits, each on its own: one that fails to set up or to
        warm up is refused with a log line and the others still load. Run it off the event loop; nothing is
        served before start()."""
        scan = scan_store(self.settings.store_path)
        required = self.settings.required_models
        # the folders as found, before loading: a model folder whose versions are all refused is still one
        build = _Build([], scan.refused, list(required) if required is not None else scan.folders)
        build.versions = self.build(admitted(scan.versions, self.settings.version_policy), build.refused)
        if not build.versions:
            log.warning("no valid model in %s", self.settings.store_path)
        self._built = build

    def build(self, version_dirs: list[Path], refused: dict[str, list[str]]) -> list[ModelVersion]:
        """Validate, set up and warm up these version folders (off the event loop: the slow part); what fails
        joins `refused`."""
        make = session_factory(self.settings)
        session_costs: dict[Path, Cost] = {}

        def make_session(path: Path):  # each session's cost, for /v1/models
            sess, session_costs[path] = measured(lambda: make(path))
            return sess
        loaded: list[tuple[LoadedVersion, Cost]] = []
        for vdir in version_dirs:  # one at a time, to measure each
            got, cost = measured(lambda d=vdir: load_versions(Scan(versions=[d], refused=refused), make_session))
            loaded += [(lv, cost) for versions in got.values() for lv in versions.values()]
        built = []
        for lv, cost in sorted(loaded, key=lambda x: (x[0].manifest.name, x[0].manifest.version)):
            graph_costs = {g: session_costs[lv.path / spec.file] for g, spec in lv.manifest.graphs.items()
                           if lv.path / spec.file in session_costs}
            try:
                built.append(ModelVersion(lv, self.settings, self.executor, self.metrics, make_session,
                                          activity=self.activity, load_cost=cost, session_costs=graph_costs))
            except Exception as e:
                log.debug("setting up %s failed", lv.path, exc_info=True)
                refuse(refused, lv.path, [f"cannot be set up for serving: {type(e).__name__}: {e}"])
        if self.settings.warmup:
            built = [mv for mv in built if self._warmed_up(mv, refused)]
        if built and self.settings.memory_release_idle_s > 0:
            self.release_memory(built)  # what warm-up grew goes back: ready at the memory a request needs
        return built

    @staticmethod
    def _warmed_up(mv: ModelVersion, refused: dict[str, list[str]]) -> bool:
        try:
            log.info("%s v%d warmed up in %.2f s on %s", mv.name, mv.version, mv.warmup(), mv.provider)
            return True
        except Exception as e:  # a graph that loads but cannot run: this version goes, the others serve
            log.debug("warming up %s failed", mv.loaded.path, exc_info=True)
            refuse(refused, mv.loaded.path, [f"failed to warm up: {type(e).__name__}: {e}"])
            return False

    def release_memory(self, versions: list[ModelVersion] | None = None) -> None:
        """Give memory that nothing uses back to the system: ONNX Runtime's CPU arena frees its unused regions
        (ModelVersion.shrink_arena: one call for the shared arena, one per session for arenas of their own), then
        glibc hands the C heap's free pages back (malloc_trim). Run after warm-up and when ONNX Runtime has been
        idle for GENSERVE_MEMORY_RELEASE_IDLE_S; the next large call grows the arena again. Never raises."""
        try:
            cpu = [mv for mv in (self.all() if versions is None else versions) if mv.provider == CPU]
            # off: nothing to shrink, the C heap's free pages are all there is
            if self.settings.ort_arena == "shared" and shared_cpu_arena():
                for mv in cpu[:1]:
                    mv.shrink_arena(graphs=1)
            elif self.settings.ort_arena != "off":
                for mv in cpu:
                    mv.shrink_arena()
            gc.collect()  # cycles of finished requests may hold arrays; the loaded models are frozen (app.py)
            memory.malloc_trim()
            self.releases += 1
        except Exception:  # memory upkeep must never take a request or a model down with it
            log.warning("releasing unused memory failed", exc_info=True)

    async def _release_when_idle(self) -> None:
        """release_memory() on the ONNX Runtime threads when memory.release_due says so: after
        GENSERVE_MEMORY_RELEASE_IDLE_S without a call, or as soon as calls pause while RSS is over
        GENSERVE_MEMORY_TARGET_MIB."""
        idle_s, target = self.settings.memory_release_idle_s, int(self.settings.memory_target_mib * 1024 * 1024)
        seen, released = self.activity.calls, memory.rss_bytes()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(memory.SETTLE_S if target else 1.0, idle_s / 2))
            if not memory.release_due(self.activity.idle_for(), self.activity.calls != seen, memory.rss_bytes(),
                                      release_idle_s=idle_s, target_bytes=target, released_rss=released):
                continue
            seen = self.activity.calls
            await loop.run_in_executor(self.executor, self.release_memory)
            released = memory.rss_bytes()

    def memory_report(self) -> dict[str, Any]:
        """This process's memory now, what reaching ready took, and what each loaded version cost to load and
        warm up (GET /v1/models, `process`)."""
        return {"pid": os.getpid(), **memory.process_memory(), "startup": dict(self.startup),
                "release": {"idle_s": self.settings.memory_release_idle_s,
                            "target_mib": self.settings.memory_target_mib, "releases": self.releases},
                "models": {name: {str(v): mv.load_report() for v, mv in sorted(versions.items())}
                           for name, versions in sorted(self.models.items())}}

    async def start(self, ready: bool = True) -> None:
        """Start the batchers and samplers of what load() built (they run on this event loop), then publish the
        whole set in one assignment; `ready` False leaves it unready (the caller has more to apply first)."""
        build, self._built = self._built, None
        if build is None:
            raise RuntimeError("Registry.start() needs a load() first")
        models: dict[str, dict[int, ModelVersion]] = {}
        for mv in build.versions:
            try:
                await mv.start()
            except Exception as e:
                log.debug("starting %s failed", mv.loaded.path, exc_info=True)
                refuse(build.refused, mv.loaded.path, [f"failed to start: {type(e).__name__}: {e}"])
                await self.stop_quietly(mv)
                continue
            models.setdefault(mv.name, {})[mv.version] = mv
            self.metrics.set_model_info(mv.name, mv.version, mv.provider, mv.family)  # only what serves
        missing = self._find_missing(build.required, models, build.refused)
        if missing:
            log.error("not ready: required models with no version serving: %s", missing)
        traffic = {}
        for name, weights in self.settings.traffic.items():
            try:
                traffic[name] = checked_split(name, weights, models.get(name, {}))
            except ValueError as e:
                log.error("GENSERVE_TRAFFIC: ignoring the split of %s: %s", name, e)
        self.snapshot = Snapshot(
            models=_frozen({name: _frozen(versions) for name, versions in models.items()}),
            refused=_frozen({path: tuple(problems) for path, problems in build.refused.items()}),
            required=tuple(build.required),
            missing=_frozen({name: tuple(why) for name, why in missing.items()}),
            ready=ready, traffic=_frozen(traffic))
        if self.settings.memory_release_idle_s > 0 and self._releasing is None:
            self._releasing = asyncio.create_task(self._release_when_idle())

    async def publish_model(self, name: str, versions: Mapping[int, ModelVersion] | None,
                            refused: dict[str, list[str]] | None = None) -> None:
        """Serve `versions` as model `name` from now on (None: unloaded), in one new Snapshot: requests that
        chose a version before keep it. `refused` replaces what was refused under the model's folder."""
        snap = self.snapshot
        models = {n: v for n, v in snap.models.items() if n != name}
        if versions:
            models[name] = _frozen(versions)
        prefix = printable(str(self.settings.store_path / name))
        kept = {p: why for p, why in snap.refused.items() if not (p == prefix or p.startswith(prefix + os.sep))}
        kept.update({p: tuple(why) for p, why in (refused or {}).items()})
        unloaded = snap.unloaded - {name} if versions is not None else snap.unloaded | {name}
        missing = self._find_missing([r for r in snap.required if r not in unloaded], models,
                                     {p: list(w) for p, w in kept.items()})
        for v, mv in (versions or {}).items():
            self.metrics.set_model_info(name, v, mv.provider, mv.family)
        traffic = {n: t for n, t in snap.traffic.items() if n != name}
        if split := tuple((v, w) for v, w in snap.traffic.get(name, ()) if v in (versions or {})):
            traffic[name] = split  # a version that left takes its share with it
        self.snapshot = replace(snap, models=_frozen(models), refused=_frozen(kept), unloaded=frozenset(unloaded),
                                missing=_frozen({n: tuple(why) for n, why in missing.items()}),
                                traffic=_frozen(traffic))

    def set_traffic(self, name: str, split: Split) -> None:
        traffic = {n: t for n, t in self.snapshot.traffic.items() if n != name}
        if split:
            traffic[name] = split
        self.snapshot = replace(self.snapshot, traffic=_frozen(traffic))

    def default_version(self, name: str, versions: Mapping[int, Any]) -> int:
        """The version a request naming none gets: drawn by the model's traffic split among those of its versions
        that are in `versions`, else the highest."""
        split = [(v, w) for v, w in self.snapshot.traffic.get(name, ()) if v in versions and w > 0]
        if not split:
            return max(versions)
        x = random.random() * sum(w for _, w in split)
        for v, w in split:
            x -= w
            if x < 0:
                return v
        return split[-1][0]

    @staticmethod
    async def stop_quietly(mv: ModelVersion) -> None:
        try:
            await mv.stop()
        except Exception:
            log.debug("stopping %s failed", mv.loaded.path, exc_info=True)

    def _find_missing(self, required: list[str], models: Mapping[str, Mapping[int, ModelVersion]],
                      refused: Mapping[str, list[str]]) -> dict[str, list[str]]:
        """Each required model with no version serving, and why: what was refused in its folder, or that the
        folder holds no version, or is not there."""
        missing = {}
        for name in required:
            if models.get(name):
                continue
            folder = self.settings.store_path / name
            prefix = printable(str(folder))
            why = [f"{path}: {'; '.join(problems)}" for path, problems in sorted(refused.items())
                   if path == prefix or path.startswith(prefix + os.sep)]
            missing[name] = why or [f"{prefix}: {'holds no version folder' if is_dir(folder) else 'no such folder'}"]
        return missing

    @property
    def fully_ready(self) -> bool:
        """What the readiness probes report: loaded, and every required model has a version serving."""
        snapshot = self.snapshot
        return snapshot.ready and not snapshot.missing

    def retire(self, versions: list[ModelVersion]) -> None:
        """Versions no longer published: after the drain grace (for requests that chose them just before), what
        they accepted finishes and they are released."""
        for mv in versions:
            self.metrics.drop_model_info(mv.name, mv.version)
            task = asyncio.get_running_loop().create_task(self._drain(mv))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    async def _drain(self, mv: ModelVersion) -> None:
        try:
            await asyncio.sleep(self.settings.drain_grace_s)
        except asyncio.CancelledError:  # shutting down: no grace, but what it accepted still finishes
            pass
        await self.stop_quietly(mv)
        log.info("%s v%d drained and released", mv.name, mv.version)

    async def stop(self) -> None:
        """Stop accepting work, finish everything accepted, then stop."""
        self.ready, self.stopping = False, True
        if self._releasing is not None:
            self._releasing.cancel()
            await asyncio.gather(self._releasing, return_exceptions=True)
        for mv in self.all():
            await mv.stop()
        for task in list(self._draining):  # versions on their way out: stopped now, without their grace
            task.cancel()
        await asyncio.gather(*self._draining, return_exceptions=True)
        self.executor.shutdown(wait=True)

    def all(self) -> list[ModelVersion]:
        return [mv for versions in self.models.values() for mv in versions.values()]

    def get(self, name: str, version: int | None = None, family: str | None = None) -> ModelVersion:
        versions = self.models.get(name)
        if not versions:
            if name in self.snapshot.unloaded:
                raise ModelNotFound(f"model '{name}' was unloaded through the repository API; "
                                    f"POST /v2/repository/models/{name}/load serves it again")
            raise ModelNotFound(f"model '{name}' is not loaded (loaded: {sorted(self.models)})")
        if version is None:
            version = self.default_version(name, versions)
        mv = versions.get(version)
        if mv is None:
            raise ModelNotFound(f"model '{name}' has no version {version} (versions: {sorted(versions)})")
        if family is not None and mv.family != family:
            raise ModelNotFound(f"model '{name}' is a {mv.family}, not a {family}")
        return mv
