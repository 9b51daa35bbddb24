"""Unit tests for service.metrics: the Prometheus side channel."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import service.metrics as metrics_mod
from service.metrics import GraphObserver, Metrics, SamplerObserver
from service.scheduling import SchedulingObserver

REPO_ROOT = Path(__file__).resolve().parents[2]
PIX = {"model": "pixelcnn", "version": "1", "graph": "g"}
SAMPLER = {"model": "pixelcnn", "version": "1", "graph": "sampler"}
INFO = {"model": "pixelcnn", "version": "1"}  # model_info has no graph label

ALL_METRIC_NAMES = [
    "genserve_http_requests_total",
    "genserve_http_request_duration_seconds",
    "genserve_batch_size",
    "genserve_queue_wait_seconds",
    "genserve_compute_seconds",
    "genserve_queue_depth",
    "genserve_items_processed_total",
    "genserve_rejections_total",
    "genserve_sampler_active_sequences",
    "genserve_model_info",
]


@pytest.fixture
def metrics(monkeypatch) -> Metrics:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    # A fresh rate limiter per test, so one test's logged failure does not silence another's.
    monkeypatch.setattr(metrics_mod, "_warn", metrics_mod._RateLimitedWarning())
    return Metrics()


def value(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return m.registry.get_sample_value(name, labels or {})


def test_on_batch_records_histograms(metrics):
    obs = metrics.observer("pixelcnn", 1, "g")
    obs.on_batch(3, [0.001, 0.002, 0.2], 0.05)
    obs.on_batch(16, [0.0] * 16, 1.5)

    assert value(metrics, "genserve_batch_size_count", PIX) == 2
    assert value(metrics, "genserve_batch_size_sum", PIX) == 19
    assert value(metrics, "genserve_batch_size_bucket", {**PIX, "le": "2.0"}) == 0
    assert value(metrics, "genserve_batch_size_bucket", {**PIX, "le": "4.0"}) == 1
    assert value(metrics, "genserve_batch_size_bucket", {**PIX, "le": "16.0"}) == 2

    assert value(metrics, "genserve_queue_wait_seconds_count", PIX) == 19
    assert value(metrics, "genserve_queue_wait_seconds_sum", PIX) == pytest.approx(0.203)
    assert value(metrics, "genserve_queue_wait_seconds_bucket", {**PIX, "le": "0.0001"}) == 16
    assert value(metrics, "genserve_queue_wait_seconds_bucket", {**PIX, "le": "0.0025"}) == 18

    assert value(metrics, "genserve_compute_seconds_count", PIX) == 2
    assert value(metrics, "genserve_compute_seconds_sum", PIX) == pytest.approx(1.55)
    assert value(metrics, "genserve_compute_seconds_bucket", {**PIX, "le": "0.05"}) == 1
    assert value(metrics, "genserve_compute_seconds_bucket", {**PIX, "le": "10.0"}) == 2


def test_compute_buckets_span_100us_to_10s(metrics):
    metrics.observer("gan", 2, "g").on_batch(1, [0.0], 0.0)
    text = metrics.render()[0].decode()
    les = [
        line.split('le="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("genserve_compute_seconds_bucket")
    ]
    assert les[0] == "0.0001" and les[-2] == "10.0" and les[-1] == "+Inf"


def test_other_observer_methods(metrics):
    obs = metrics.observer("pixelcnn", 1, "g")
    obs.on_items(5)
    obs.on_items(2)
    obs.on_reject("queue_full")
    obs.on_reject("queue_full")
    obs.on_reject("timeout")
    obs.on_queue_depth(7)
    obs.on_queue_depth(3)
    sampler = metrics.sampler_observer("pixelcnn", 1)
    for active in (8, 8, 5, 1):
        sampler.on_sampler_step(active)

    assert value(metrics, "genserve_items_processed_total", PIX) == 7
    assert value(metrics, "genserve_rejections_total", {**PIX, "reason": "queue_full"}) == 2
    assert value(metrics, "genserve_rejections_total", {**PIX, "reason": "timeout"}) == 1
    assert value(metrics, "genserve_queue_depth", PIX) == 3
    assert value(metrics, "genserve_sampler_active_sequences_count", SAMPLER) == 4
    assert value(metrics, "genserve_sampler_active_sequences_sum", SAMPLER) == 22
    assert value(metrics, "genserve_sampler_active_sequences_bucket", {**SAMPLER, "le": "4.0"}) == 1
    assert value(metrics, "genserve_sampler_active_sequences_bucket", {**SAMPLER, "le": "8.0"}) == 4
    assert value(metrics, "genserve_sampler_active_sequences_count", PIX) is None  # a graph's observer: no series


def test_sampler_series_exist_for_the_sampler_only(metrics):
    """A graph's observer creates no sampler series (it used to export the histogram as zeros for every graph);
    the sampler's observer records the batching series too, under graph="sampler"."""
    graph = metrics.observer("pixelcnn", 1, "logprob")
    sampler = metrics.sampler_observer("pixelcnn", 1)
    assert metrics.sampler_observer("pixelcnn", 1) is sampler and isinstance(sampler, SamplerObserver)
    graph.on_sampler_step(3)  # the protocol's no-op default: nothing recorded
    graph.on_batch(2, [0.0, 0.0], 0.01)
    sampler.on_batch(1, [0.0], 0.01)
    text = metrics.render()[0].decode()
    series = [s for f in text_string_to_metric_families(text) for s in f.samples
              if s.name.startswith("genserve_sampler_active_sequences")]
    assert series and {s.labels["graph"] for s in series} == {"sampler"}
    assert value(metrics, "genserve_sampler_active_sequences_count", SAMPLER) == 0
    assert value(metrics, "genserve_batch_size_count", {**SAMPLER}) == 1
    assert value(metrics, "genserve_batch_size_count", {**PIX, "graph": "logprob"}) == 1


def test_observers_are_per_model_version_and_cached(metrics):
    a = metrics.observer("vae", 1, "g")
    assert metrics.observer("vae", 1, "g") is a
    metrics.observer("vae", 2, "g").on_items(4)
    a.on_items(1)
    assert value(metrics, "genserve_items_processed_total", {"model": "vae", "version": "1", "graph": "g"}) == 1
    assert value(metrics, "genserve_items_processed_total", {"model": "vae", "version": "2", "graph": "g"}) == 4


def test_rejection_reasons_are_capped(metrics):
    obs = metrics.observer("gan", 1, "g")
    for i in range(metrics_mod._MAX_REASONS + 5):
        obs.on_reject(f"reason{i}")
    gan = {"model": "gan", "version": "1", "graph": "g"}
    last = f"reason{metrics_mod._MAX_REASONS + 4}"
    assert value(metrics, "genserve_rejections_total", {**gan, "reason": "reason0"}) == 1
    assert value(metrics, "genserve_rejections_total", {**gan, "reason": last}) is None
    assert value(metrics, "genserve_rejections_total", {**gan, "reason": "other"}) == 5


def test_observe_request(metrics):
    metrics.observe_request("/v1/models/{name}/generate", "POST", 200, 0.02)
    metrics.observe_request("/v1/models/{name}/generate", "POST", 200, 0.3)
    metrics.observe_request("/v1/models/{name}/generate", "POST", 422, 0.001)
    ok = {"route": "/v1/models/{name}/generate", "method": "POST", "status": "200"}
    assert value(metrics, "genserve_http_requests_total", ok) == 2
    assert value(metrics, "genserve_http_requests_total", {**ok, "status": "422"}) == 1
    dur = {"route": "/v1/models/{name}/generate", "method": "POST"}
    assert value(metrics, "genserve_http_request_duration_seconds_count", dur) == 3
    assert value(metrics, "genserve_http_request_duration_seconds_sum", dur) == pytest.approx(0.321)


def test_model_info_gauge(metrics):
    metrics.set_model_info("pixelcnn", 1, "CUDAExecutionProvider", "pixelcnn")
    labels = {**INFO, "provider": "CUDAExecutionProvider", "family": "pixelcnn"}
    assert value(metrics, "genserve_model_info", labels) == 1
    # Reloaded on another provider: the old series goes away, only the new one is 1.
    metrics.set_model_info("pixelcnn", 1, "CPUExecutionProvider", "pixelcnn")
    assert value(metrics, "genserve_model_info", labels) is None
    assert value(metrics, "genserve_model_info", {**labels, "provider": "CPUExecutionProvider"}) == 1


def test_bad_input_never_raises_and_logs(metrics, caplog):
    obs = metrics.observer("pixelcnn", 1, "g")
    with caplog.at_level(logging.WARNING, logger="service.metrics"):
        obs.on_batch(None, [0.1], 0.1)  # type: ignore[arg-type]
        obs.on_batch(2, None, 0.1)  # type: ignore[arg-type]
        obs.on_batch(2, [0.1, "soon"], 0.1)  # type: ignore[list-item]
        obs.on_batch(-1, [], 0.1)
        obs.on_items(None)  # type: ignore[arg-type]
        obs.on_items(-3)  # counters cannot go down
        obs.on_reject(object())  # type: ignore[arg-type]  # str() works: recorded, not an error
        obs.on_queue_depth("deep")  # type: ignore[arg-type]
        metrics.sampler_observer("pixelcnn", 1).on_sampler_step(None)  # type: ignore[arg-type]
        metrics.observe_request("/x", "GET", "teapot", 0.1)  # type: ignore[arg-type]
        metrics.observe_request("/x", "GET", 200, None)  # type: ignore[arg-type]
        metrics.set_model_info("m", 1, "cpu", "gan")
    # Nothing half-recorded from the failed calls.
    assert value(metrics, "genserve_batch_size_count", PIX) == 0
    assert value(metrics, "genserve_items_processed_total", PIX) == 0
    assert value(metrics, "genserve_sampler_active_sequences_count", SAMPLER) == 0
    failed = {r.getMessage().split(" failed")[0] for r in caplog.records}
    assert {
        "metrics: on_batch",
        "metrics: on_items",
        "metrics: on_queue_depth",
        "metrics: on_sampler_step",
        "metrics: observe_request",
    } <= failed
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_failure_warnings_are_rate_limited(metrics, caplog):
    obs = metrics.observer("pixelcnn", 1, "g")
    with caplog.at_level(logging.WARNING, logger="service.metrics"):
        for _ in range(50):
            obs.on_items(None)  # type: ignore[arg-type]
    assert len(caplog.records) == 1


def test_metrics_failure_inside_prometheus_is_swallowed(metrics, monkeypatch):
    obs = metrics.observer("pixelcnn", 1, "g")

    def boom(*args, **kwargs):
        raise RuntimeError("registry on fire")

    monkeypatch.setattr(obs._batch_size, "observe", boom)
    monkeypatch.setattr(obs._items, "inc", boom)
    obs.on_batch(4, [0.1] * 4, 0.2)
    obs.on_items(4)


def test_non_finite_durations_are_skipped(metrics):
    obs = metrics.observer("pixelcnn", 1, "g")
    obs.on_batch(2, [float("nan"), -0.5], float("inf"))
    assert value(metrics, "genserve_batch_size_count", PIX) == 1
    assert value(metrics, "genserve_queue_wait_seconds_count", PIX) == 1  # the NaN is dropped
    assert value(metrics, "genserve_queue_wait_seconds_sum", PIX) == 0  # negative clamps to 0
    assert value(metrics, "genserve_compute_seconds_count", PIX) == 0


def test_render_contains_every_metric(metrics):
    obs = metrics.observer("pixelcnn", 1, "g")
    obs.on_batch(1, [0.01], 0.01)
    obs.on_items(1)
    obs.on_reject("queue_full")
    obs.on_queue_depth(0)
    metrics.sampler_observer("pixelcnn", 1).on_sampler_step(1)
    metrics.observe_request("/healthz", "GET", 200, 0.001)
    metrics.set_model_info("pixelcnn", 1, "CPUExecutionProvider", "pixelcnn")
    body, content_type = metrics.render()
    assert isinstance(body, bytes)
    assert content_type.startswith("text/plain")
    text = body.decode()
    for name in ALL_METRIC_NAMES:
        assert name in text, name
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["genserve_http_requests"] == "counter"
    assert families["genserve_batch_size"] == "histogram"
    assert families["genserve_queue_depth"] == "gauge"
    assert families["genserve_model_info"] == "gauge"
    assert families["genserve_rejections"] == "counter"


def test_metric_names_in_module_docstring():
    for name in ALL_METRIC_NAMES:
        assert name in metrics_mod.__doc__, name


def test_independent_registries(metrics):
    other = Metrics()
    gan = {"model": "gan", "version": "1", "graph": "g"}
    metrics.observer("gan", 1, "g").on_items(3)
    assert other.registry.get_sample_value("genserve_items_processed_total", gan) is None
    assert value(metrics, "genserve_items_processed_total", gan) == 3


def test_observers_implement_the_scheduling_protocol():
    """Every method a scheduler may call exists on both observers (the protocol's defaults fill in the rest)."""
    protocol = {n for n in dir(SchedulingObserver) if n.startswith("on_")}
    assert protocol == {"on_batch", "on_items", "on_reject", "on_queue_depth", "on_sampler_step", "on_cancel"}
    for cls in (GraphObserver, SamplerObserver):
        assert SchedulingObserver in cls.__mro__  # subclassed explicitly, so the defaults are inherited
        assert protocol <= {n for n in dir(cls) if n.startswith("on_")}
    assert SamplerObserver.on_sampler_step is not SchedulingObserver.on_sampler_step
    assert GraphObserver.on_sampler_step is SchedulingObserver.on_sampler_step  # a graph's: no-op


# ------------------------------------------------------------------------------------------ multiprocess

_WRITER = textwrap.dedent(
    """
    import sys
    from service.metrics import Metrics

    items, depth = int(sys.argv[1]), int(sys.argv[2])
    m = Metrics()
    assert m.multiprocess
    obs = m.observer("pixelcnn", 1, "g")
    obs.on_batch(items, [0.001] * items, 0.01)
    obs.on_items(items)
    obs.on_queue_depth(depth)
    obs.on_reject("queue_full")
    m.observe_request("/v1/models/{name}/generate", "POST", 200, 0.05)
    m.set_model_info("pixelcnn", 1, "CPUExecutionProvider", "pixelcnn")
    """
)

_READER = textwrap.dedent(
    """
    import sys
    from service.metrics import Metrics

    body, content_type = Metrics().render()
    sys.stdout.write(body.decode())
    """
)


def _run(script: str, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_multiprocess_mode_aggregates_across_processes(tmp_path):
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k.lower() != "prometheus_multiproc_dir"}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(mp_dir)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")

    _run(_WRITER, env, "3", "2")
    _run(_WRITER, env, "4", "5")
    assert len(list(mp_dir.glob("*.db"))) >= 2  # each process wrote its own files

    text = _run(_READER, env)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    pix = tuple(sorted(PIX.items()))

    def get(name: str, **extra: str) -> float | None:
        return samples.get((name, tuple(sorted({**PIX, **extra}.items()))))

    assert get("genserve_items_processed_total") == 7
    assert get("genserve_batch_size_count") == 2
    assert get("genserve_batch_size_sum") == 7
    assert get("genserve_batch_size_bucket", le="4.0") == 2
    assert get("genserve_queue_wait_seconds_count") == 7
    assert get("genserve_rejections_total", reason="queue_full") == 2
    assert get("genserve_queue_depth") == 7  # livesum over the (not marked dead) processes
    info = {**INFO, "provider": "CPUExecutionProvider", "family": "pixelcnn"}
    assert samples.get(("genserve_model_info", tuple(sorted(info.items())))) == 2  # livesum: both processes serve it
    route = {"route": "/v1/models/{name}/generate", "method": "POST"}
    assert samples[("genserve_http_requests_total", tuple(sorted({**route, "status": "200"}.items())))] == 2
    assert samples[("genserve_http_request_duration_seconds_count", tuple(sorted(route.items())))] == 2
    assert ("genserve_batch_size_count", pix) in samples
