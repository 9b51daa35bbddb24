"""Prometheus metrics for genserve, kept as a side channel: recording a metric never fails a request.

Every recording method (``GraphObserver.on_*``, ``Metrics.observe_request``, ``Metrics.set_model_info``)
catches any exception, logs a rate-limited warning on ``service.metrics`` and carries on.

The batchers and the PixelCNN sampler report through one observer each (``Metrics.observer`` for a graph's
batcher, ``Metrics.sampler_observer`` for the sampler, whose ``graph`` label is ``sampler``): both implement
``service.scheduling.SchedulingObserver``.

Metrics (all names prefixed ``genserve_``, base units; ``model`` is the model name, ``version`` its integer
version as a string, ``graph`` the ONNX graph in it (e.g. ``encoder``); ``route`` is the route template,
e.g. ``/v1/models/{name}``):

- ``genserve_http_requests_total`` (counter; route, method, status): HTTP requests handled.
- ``genserve_http_request_duration_seconds`` (histogram; route, method): request duration, buckets
  0.001 s .. 60 s.
- ``genserve_batch_size`` (histogram; model, version, graph): items per batch sent to the model, buckets
  1, 2, 4, .., 256.
- ``genserve_queue_wait_seconds`` (histogram; model, version, graph): per item, time from enqueue to the start of
  its batch, buckets 0.0001 s .. 10 s.
- ``genserve_compute_seconds`` (histogram; model, version, graph): model compute time per batch, buckets
  0.0001 s .. 10 s.
- ``genserve_queue_depth`` (gauge; model, version, graph): items waiting in the batching queue.
- ``genserve_items_processed_total`` (counter; model, version, graph): items completed, one per row of a
  batch: images generated or decoded, but also inputs encoded or scored (e.g. the VAE ``encoder``, the
  PixelCNN ``logprob``); for ``graph="sampler"``, images sampled.
- ``genserve_rejections_total`` (counter; model, version, graph, reason): requests turned away or failed:
  ``queue_full``, ``expected_wait`` (the queue ahead would outlast the limit or the deadline), ``deadline``,
  ``closed`` (shutting down), ``error``; at most 32 distinct reasons per model version, further ones count as
  ``other``.
- ``genserve_sampler_active_sequences`` (histogram; model, version, graph): PixelCNN sampling, number of
  sequences sharing each autoregressive sampling step, buckets 1, 2, 4, .., 256; only ``graph="sampler"``.
- ``genserve_model_info`` (gauge; model, version, provider, family): for each loaded model version, with its
  ONNX Runtime execution provider and model family (pixelcnn / vae / gan), the number of worker processes
  serving it: 1 with one worker; with several, it tells when a version has reached them all.
- ``genserve_inflight_requests`` (gauge): data-plane requests (``/v1``, ``/v2``) admitted and not yet answered.
- ``genserve_shed_requests_total`` (counter; reason): data-plane requests answered 503 by admission control
  before their body was read (``inflight``: the bound on requests in flight on that path was reached;
  ``loop_lag``: the event loop ran too far behind). Those refused before the app ran are counted in
  ``genserve_http_requests_total`` under ``route="refused"``.
- ``genserve_client_timeouts_total`` (counter; phase): connections cut off because the client sent its request
  headers (``headers``) or body (``body``) too slowly.
- ``genserve_api_key_requests_total`` (counter; key_id): data-plane requests let through by their API key, while
  API keys are on; ``key_id`` is ``service.auth.key_id`` of the key (never the key), or ``admin``.
- ``genserve_auth_failures_total`` (counter; credential, reason): requests refused for their credential:
  ``credential`` is ``api_key`` (401 on the data plane) or ``admin_token`` (the admin routes), ``reason``
  ``missing``, ``wrong``, or ``disabled`` (an admin route while no admin token is set: 403).

``genserve_model_info`` is a Gauge (each process sets 1) rather than a prometheus ``Info`` metric because Info
is not supported in multiprocess mode; using the Gauge form always keeps both modes' output identical. When a
model version's provider/family changes, the old series is removed (set to 0 in multiprocess mode).

Multiprocess mode (several server worker processes behind one port): set ``PROMETHEUS_MULTIPROC_DIR`` to an
empty, writable directory **before anything imports prometheus_client** (the client picks its
mmap-file-backed value class once, at import). Metrics are then created as usual (here, on the
``Metrics`` instance's own registry) and every process writes its samples to ``*.db`` files in that
directory; ``Metrics.render()`` builds a fresh ``CollectorRegistry`` with a
``prometheus_client.multiprocess.MultiProcessCollector`` on each scrape, which sums counters and histograms
over all processes (live or dead). Gauges: ``genserve_queue_depth`` uses ``livesum`` (sum over live
processes) and so does ``genserve_model_info``, counting the workers that serve a version; for ``live*``
modes the process manager must call ``prometheus_client.multiprocess.mark_process_dead(pid)`` when a worker
exits (e.g. gunicorn's ``child_exit`` hook), and the directory must be wiped between server runs.
``_created`` samples are not exported in multiprocess mode. Several ``Metrics`` objects in one process (as in
tests) each get an independent registry in normal mode; in multiprocess mode they share the same per-process
files.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import values as _prom_values
from prometheus_client.multiprocess import MultiProcessCollector

from service.scheduling import SchedulingObserver

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "LATENCY_BUCKETS",
    "REQUEST_BUCKETS",
    "SAMPLER_GRAPH",
    "GraphObserver",
    "Metrics",
    "SamplerObserver",
    "multiprocess_dir",
]

logger = logging.getLogger(__name__)

PREFIX = "genserve_"
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Whole HTTP requests: a full PixelCNN sampling run can take seconds, so go past 10 s.
REQUEST_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

_WARN_INTERVAL_S = 60.0
_MAX_REASONS = 32  # cap on distinct rejection reasons (and cancellation stages) per graph: label cardinality
SAMPLER_GRAPH = "sampler"  # the graph label of the PixelCNN sampler's series


def _seconds(value: object) -> float | None:
    """A duration as a float >= 0; None (not recorded) when it is NaN or infinite."""
    x = float(value)  # type: ignore[arg-type]
    if not math.isfinite(x):
        return None
    return x if x > 0.0 else 0.0


def multiprocess_dir() -> str | None:
    """The ``PROMETHEUS_MULTIPROC_DIR`` (or legacy lower-case) setting, or None when unset/empty."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


class _RateLimitedWarning:
    """Log at most one warning per key per interval, counting the ones suppressed in between."""

    def __init__(self, interval_s: float = _WARN_INTERVAL_S) -> None:
        self._interval = interval_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, key: str, exc: BaseException) -> None:
        try:
            now = time.monotonic()
            with self._lock:
                last = self._last.get(key)
                if last is not None and now - last < self._interval:
                    self._suppressed[key] = self._suppressed.get(key, 0) + 1
                    return
                self._last[key] = now
                suppressed = self._suppressed.pop(key, 0)
            more = f" ({suppressed} similar suppressed)" if suppressed else ""
            logger.warning("metrics: %s failed: %s: %s%s", key, type(exc).__name__, exc, more)
        except Exception:  # logging itself must never raise into a request either
            pass


_warn = _RateLimitedWarning()


class GraphObserver(SchedulingObserver):
    """Records the batching metrics of one graph of one model version. Every method swallows its own errors.

    Label children are bound once here, so the hot-path calls only do the observations; only the series of
    what this observer records are created (an unobserved labelled child would be exported as zeros).
    """

    def __init__(self, metrics: Metrics, model: str, version: int, graph: str) -> None:
        self.model = str(model)
        self.version = str(version)
        self.graph = str(graph)
        labels = (self.model, self.version, self.graph)
        self._batch_size = metrics.batch_size.labels(*labels)
        self._queue_wait = metrics.queue_wait_seconds.labels(*labels)
        self._compute = metrics.compute_seconds.labels(*labels)
        self._queue_depth = metrics.queue_depth.labels(*labels)
        self._items = metrics.items_processed_total.labels(*labels)
        self._cancelled = metrics.cancelled_total
        self._cancel_children: dict[str, Counter] = {}
        self._rejections = metrics.rejections_total
        self._reject_children: dict[str, Counter] = {}

    def on_batch(self, batch_size: int, queue_waits_s: Sequence[float], compute_s: float) -> None:
        """One batch ran: its size, each item's time in the queue, and the batch's compute time."""
        try:
            size = int(batch_size)
            if size < 0:
                raise ValueError(f"negative batch size {batch_size!r}")
            waits = [_seconds(w) for w in queue_waits_s]
            compute = _seconds(compute_s)
            self._batch_size.observe(size)
            for w in waits:
                if w is not None:
                    self._queue_wait.observe(w)
            if compute is not None:
                self._compute.observe(compute)
        except Exception as exc:
            _warn("on_batch", exc)

    def on_items(self, n: int) -> None:
        """``n`` items (images, or inputs encoded or scored) completed successfully."""
        try:
            self._items.inc(int(n))
        except Exception as exc:
            _warn("on_items", exc)

    def on_reject(self, reason: str) -> None:
        """A request was turned away (``reason`` should come from a small fixed set, e.g. ``queue_full``)."""
        try:
            self._count(self._rejections, self._reject_children, str(reason))
        except Exception as exc:
            _warn("on_reject", exc)

    def on_cancel(self, stage: str) -> None:
        """A request's caller went away (client disconnected, or its task was cancelled) at ``stage``."""
        try:
            self._count(self._cancelled, self._cancel_children, str(stage))
        except Exception as exc:
            _warn("on_cancel", exc)

    def _count(self, counter: Counter, children: dict[str, Counter], key: str) -> None:
        """One more of this graph's `counter` under the last label `key`; past _MAX_REASONS distinct keys, under
        "other" (label cardinality stays bounded whatever a caller passes)."""
        child = children.get(key)
        if child is None and len(children) >= _MAX_REASONS:
            key = "other"
            child = children.get(key)
        if child is None:
            child = children[key] = counter.labels(self.model, self.version, self.graph, key)
        child.inc()

    def on_queue_depth(self, depth: int) -> None:
        """Current number of items waiting in this model version's queue."""
        try:
            self._queue_depth.set(int(depth))
        except Exception as exc:
            _warn("on_queue_depth", exc)


class SamplerObserver(GraphObserver):
    """The PixelCNN sampler's observer (``graph="sampler"``): the batching metrics, one batch per sampling
    step, plus the number of sequences sharing each step."""

    def __init__(self, metrics: Metrics, model: str, version: int) -> None:
        super().__init__(metrics, model, version, SAMPLER_GRAPH)
        self._sampler_active = metrics.sampler_active_sequences.labels(self.model, self.version, self.graph)

    def on_sampler_step(self, active: int) -> None:
        """One autoregressive (PixelCNN) sampling step ran with ``active`` sequences sharing it."""
        try:
            self._sampler_active.observe(int(active))
        except Exception as exc:
            _warn("on_sampler_step", exc)


class Metrics:
    """All genserve metrics, on a registry of their own (so several apps can live in one process).

    ``multiprocess`` defaults to whether ``PROMETHEUS_MULTIPROC_DIR`` is set.
    """

    def __init__(self, *, multiprocess: bool | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir()
        self.multiprocess = bool(self.multiprocess_dir) if multiprocess is None else multiprocess
        if self.multiprocess and not self.multiprocess_dir:
            raise ValueError("multiprocess metrics need PROMETHEUS_MULTIPROC_DIR set to a directory")
        if self.multiprocess and not getattr(_prom_values.ValueClass, "_multiprocess", False):
            # The env var was set after prometheus_client was imported: values live in this process only.
            logger.warning(
                "PROMETHEUS_MULTIPROC_DIR is set but prometheus_client was imported before it was; "
                "metrics from this process will not reach the multiprocess collector"
            )
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests_total = Counter(
            PREFIX + "http_requests_total",
            "HTTP requests handled, by route template, method and status code.",
            ("route", "method", "status"),
            registry=r,
        )
        self.http_request_duration_seconds = Histogram(
            PREFIX + "http_request_duration_seconds",
            "HTTP request duration in seconds, by route template and method.",
            ("route", "method"),
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        model_labels = ("model", "version", "graph")
        self.batch_size = Histogram(
            PREFIX + "batch_size",
            "Number of items in each batch sent to the model.",
            model_labels,
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            PREFIX + "queue_wait_seconds",
            "Time each item waited in the batching queue before its batch started, in seconds.",
            model_labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            PREFIX + "compute_seconds",
            "Model compute time per batch, in seconds.",
            model_labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            PREFIX + "queue_depth",
            "Items currently waiting in the batching queue.",
            model_labels,
            multiprocess_mode="livesum",
            registry=r,
        )
        self.items_processed_total = Counter(
            PREFIX + "items_processed_total",
            "Items completed, one per row of a batch: images generated or decoded, inputs encoded or scored; "
            "for the sampler, images sampled.",
            model_labels,
            registry=r,
        )
        self.rejections_total = Counter(
            PREFIX + "rejections_total",
            "Requests rejected before running, by reason.",
            ("model", "version", "graph", "reason"),
            registry=r,
        )
        self.cancelled_total = Counter(
            PREFIX + "cancelled_total",
            "Requests whose caller went away before their work was done, by stage: queued (none of it computed), "
            "sampling (its sequences left the sampler at the next step), computing (the batch holding it finished).",
            ("model", "version", "graph", "stage"),
            registry=r,
        )
        self.sampler_active_sequences = Histogram(
            PREFIX + "sampler_active_sequences",
            "Autoregressive (PixelCNN) sampling: number of sequences sharing each sampling step (graph=sampler).",
            model_labels,
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            PREFIX + "model_info",
            "Loaded model versions with their execution provider and model family: the number of worker "
            "processes serving each (1 with one worker).",
            ("model", "version", "provider", "family"),
            multiprocess_mode="livesum",
            registry=r,
        )
        self.inflight_requests = Gauge(
            PREFIX + "inflight_requests",
            "Data-plane requests admitted and not yet answered.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.shed_requests_total = Counter(
            PREFIX + "shed_requests_total",
            "Data-plane requests answered 503 by admission control before their body was read, by reason.",
            ("reason",),
            registry=r,
        )
        self.client_timeouts_total = Counter(
            PREFIX + "client_timeouts_total",
            "Connections cut off because the client sent its request headers or body too slowly, by phase.",
            ("phase",),
            registry=r,
        )
        self.api_key_requests_total = Counter(
            PREFIX + "api_key_requests_total",
            "Data-plane requests let through by their API key, by key id (a digest's prefix, never the key).",
            ("key_id",),
            registry=r,
        )
        self.auth_failures_total = Counter(
            PREFIX + "auth_failures_total",
            "Requests refused for their credential (api_key or admin_token), by reason: missing, wrong, disabled.",
            ("credential", "reason"),
            registry=r,
        )
        self._info_lock = threading.Lock()
        self._info_labels: dict[tuple[str, str], tuple[str, str]] = {}
        self._observers: dict[tuple[str, str, str], GraphObserver] = {}
        self._route_children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}

    # ------------------------------------------------------------------------------------------ record

    def observer(self, model: str, version: int, graph: str) -> GraphObserver:
        """The (cached) observer recording the batching metrics of one graph of one model version."""
        key = (str(model), str(version), str(graph))
        obs = self._observers.get(key)
        if obs is None:
            obs = self._observers.setdefault(key, GraphObserver(self, model, version, graph))
        return obs

    def sampler_observer(self, model: str, version: int) -> SamplerObserver:
        """The (cached) observer of one model version's PixelCNN sampler (``graph="sampler"``)."""
        key = (str(model), str(version), SAMPLER_GRAPH)
        obs = self._observers.get(key)
        if not isinstance(obs, SamplerObserver):
            obs = self._observers[key] = SamplerObserver(self, model, version)
        return obs

    def observe_request(self, route: str, method: str, status: int, duration_s: float) -> None:
        """Count one finished HTTP request and record its duration. Never raises."""
        try:
            key = (str(route), str(method), str(int(status)))
            children = self._route_children.get(key)
            if children is None:
                children = (
                    self.http_requests_total.labels(*key),
                    self.http_request_duration_seconds.labels(key[0], key[1]),
                )
                self._route_children[key] = children
            duration = _seconds(duration_s)
            children[0].inc()
            if duration is not None:
                children[1].observe(duration)
        except Exception as exc:
            _warn("observe_request", exc)

    def set_inflight(self, n: int) -> None:
        """Data-plane requests in flight in this process now. Never raises."""
        try:
            self.inflight_requests.set(int(n))
        except Exception as exc:
            _warn("set_inflight", exc)

    def on_shed(self, reason: str) -> None:
        """A request was refused by admission control (``reason``: a small fixed set). Never raises."""
        try:
            self.shed_requests_total.labels(str(reason)).inc()
        except Exception as exc:
            _warn("on_shed", exc)

    def on_client_timeout(self, phase: str) -> None:
        """A slow client was cut off while sending its ``headers`` or ``body``. Never raises."""
        try:
            self.client_timeouts_total.labels(str(phase)).inc()
        except Exception as exc:
            _warn("on_client_timeout", exc)

    def on_api_key(self, key_id: str) -> None:
        """A data-plane request was let through by the key with this id. Never raises."""
        try:
            self.api_key_requests_total.labels(str(key_id)).inc()
        except Exception as exc:
            _warn("on_api_key", exc)

    def on_auth_failure(self, credential: str, reason: str) -> None:
        """A request was refused for its ``credential`` (``api_key``, ``admin_token``): ``reason`` is ``missing``,
        ``wrong`` or ``disabled``. Never raises."""
        try:
            self.auth_failures_total.labels(str(credential), str(reason)).inc()
        except Exception as exc:
            _warn("on_auth_failure", exc)

    def set_model_info(self, model: str, version: int, provider: str, family: str) -> None:
        """Publish ``genserve_model_info{model,version,provider,family} 1`` for a loaded model version."""
        try:
            mv = (str(model), str(version))
            pf = (str(provider), str(family))
            with self._info_lock:
                old = self._info_labels.get(mv)
                if old is not None and old != pf:
                    self._drop_info(mv, old)
                self._info_labels[mv] = pf
                self.model_info.labels(*mv, *pf).set(1)
        except Exception as exc:
            _warn("set_model_info", exc)

    def drop_model_info(self, model: str, version: int) -> None:
        """A version no longer serves (unloaded, or left its version policy): its info series goes."""
        try:
            mv = (str(model), str(version))
            with self._info_lock:
                if (old := self._info_labels.pop(mv, None)) is not None:
                    self._drop_info(mv, old)
        except Exception as exc:
            _warn("drop_model_info", exc)

    def _drop_info(self, mv: tuple[str, str], pf: tuple[str, str]) -> None:
        if self.multiprocess:  # label removal is not implemented for multiprocess files
            self.model_info.labels(*mv, *pf).set(0)
        else:
            self.model_info.remove(*mv, *pf)

    # ------------------------------------------------------------------------------------------ export

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type; aggregated over processes in multiprocess mode."""
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
