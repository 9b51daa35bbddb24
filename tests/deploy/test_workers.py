"""Several uvicorn worker processes (GENSERVE_WORKERS=2) behind one port: both serve, and /metrics, whichever
worker answers it, reports them together (prometheus-client multiprocess mode): the request counter equals the
requests sent, across both processes, a crashed worker's counts survive it, and its live gauges do not."""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tests.deploy.conftest import REPO, SHIPPED_STORE, scrape, server_process, wait_ready_everywhere

pytestmark = pytest.mark.slow

ROUTE = "/v1/gan/sample"
STALE = 1000      # requests "counted" by an earlier run in the same directory, which start-up must wipe


def per_process_counts(mp_dir: Path, scratch: Path) -> dict[int, float]:
    """Requests on ROUTE counted by each process, read from its own counter file alone."""
    counts = {}
    for f in mp_dir.glob("counter_*.db"):
        pid = int(f.stem.split("_")[1])
        alone = scratch / f"pid-{pid}-{time.monotonic_ns()}"
        alone.mkdir()
        shutil.copy(f, alone / f.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))
        counts[pid] = sum(s.value for m in registry.collect() for s in m.samples
                          if s.name == "genserve_http_requests_total" and s.labels.get("route") == ROUTE)
    return counts


def send(base: str, n: int, seed0: int) -> None:
    """n requests, 8 at a time, each answered 200. A 503 with Retry-After is admission control shedding load
    before the request ran (a worker's event loop fell behind on this shared 2-core machine): it is not counted
    on ROUTE, and a well-behaved client retries it, as this one does, a bounded number of times."""
    def one(i: int) -> tuple[int, str]:
        for _ in range(5):
            with httpx.Client(base_url=base, timeout=60) as c:      # a new connection: any worker may accept it
                r = c.post(ROUTE, json={"n": 1, "seed": seed0 + i})
            if r.status_code != 503 or "retry-after" not in r.headers:
                break
            time.sleep(min(float(r.headers["retry-after"]), 1.0))
        return r.status_code, r.text[:200]

    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(n)))
    assert [status for status, _ in answers] == [200] * n, [a for a in answers if a[0] != 200]


def metrics_total(base: str) -> float:
    return scrape(httpx.get(base + "/metrics", timeout=10).text, "genserve_http_requests_total", route=ROUTE)


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():                                          # bounded by timeout_s
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting until {what}"
        time.sleep(0.25)


def test_two_workers_share_one_metrics_view(tmp_path, monkeypatch):
    mp_dir = tmp_path / "prometheus-multiproc"
    mp_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp_dir), "PYTHONPATH": str(REPO)}
    stale = textwrap.dedent(f"""
        from service.metrics import Metrics
        m = Metrics()
        for _ in range({STALE}):
            m.observe_request("{ROUTE}", "POST", 200, 0.01)
    """)
    subprocess.run([sys.executable, "-c", stale], env=env, check=True, timeout=60, cwd=REPO)
    assert per_process_counts(mp_dir, tmp_path) and sum(per_process_counts(mp_dir, tmp_path).values()) == STALE

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(mp_dir))  # for the server process, restored after
    log = tmp_path / "server.log"
    with server_process(SHIPPED_STORE, log, timeout_s=240, workers="2", intra_op_threads="1") as (base, proc):
        wait_ready_everywhere(base)
        assert metrics_total(base) == 0, "the files of the earlier run were not wiped at start-up"

        sent = 0
        for round_ in range(6):                                      # bounded: 6 rounds of 24 requests
            send(base, 24, seed0=100 * round_)
            sent += 24
            counts = per_process_counts(mp_dir, tmp_path)
            if sum(1 for c in counts.values() if c > 0) >= 2:
                break
        # a request is counted just after its response is sent: wait for the last ones (bounded)
        wait_until(lambda: metrics_total(base) == sent, 10, f"/metrics counts all {sent} requests")
        counts = per_process_counts(mp_dir, tmp_path)
        serving = {pid: c for pid, c in counts.items() if c > 0}
        assert len(serving) == 2, f"one worker served every request: {counts}\n{log.read_text()}"
        assert proc.pid not in serving, "the requests are served by the workers, not the supervisor"
        assert sum(serving.values()) == sent
        assert metrics_total(base) == sent, "/metrics does not add up the workers' counts"
        text = httpx.get(base + "/metrics", timeout=10).text
        # model info is a `livesum` gauge: the number of workers serving each model version
        assert scrape(text, "genserve_model_info", model="gan") == 2
        assert scrape(text, "genserve_batch_size_sum", model="gan", graph="generator") == sent

        # A worker that crashes: uvicorn starts another, which withdraws the dead one's live gauges (queue
        # depth, model info); the requests it counted stay in the totals.
        victim = min(serving)
        assert (mp_dir / f"gauge_livesum_{victim}.db").exists()
        os.kill(victim, signal.SIGKILL)                              # one of the workers this test started
        wait_until(lambda: not (mp_dir / f"gauge_livesum_{victim}.db").exists(), 120,
                   f"the replacement worker forgets the live gauges of {victim}")
        wait_ready_everywhere(base)
        assert metrics_total(base) == sent
        send(base, 8, seed0=10_000)
        wait_until(lambda: metrics_total(base) == sent + 8, 10, f"/metrics counts all {sent + 8} requests")
        assert scrape(httpx.get(base + "/metrics", timeout=10).text, "genserve_model_info", model="gan") == 2
        workers = {int(f.stem.rsplit("_", 1)[1]) for f in mp_dir.glob("gauge_livesum_*.db")}
        assert len(workers) == 2 and victim not in workers, workers

        # SIGHUP to the supervisor is logged and ignored: uvicorn's own would restart every worker.
        proc.send_signal(signal.SIGHUP)
        time.sleep(2)
        assert proc.poll() is None and all(os.path.exists(f"/proc/{pid}") for pid in workers)
        send(base, 4, seed0=20_000)
        assert "SIGHUP received and ignored" in log.read_text()

    # Workers that exit cleanly (SIGTERM at shutdown) withdraw their live gauges themselves.
    assert proc.poll() is not None
    assert not list(mp_dir.glob("gauge_live*.db")), list(mp_dir.iterdir())
