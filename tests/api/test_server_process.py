"""The real thing: `python -m service` in its own process on a free loopback port, driven over HTTP."""

from __future__ import annotations

import concurrent.futures as cf
import signal
import time

import httpx
import pytest

from tests.api.conftest import server_process

pytestmark = pytest.mark.slow


def scrape(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of one metric whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def server(tiny_store, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with server_process(tiny_store, log, max_delay_ms="20") as (base, proc):
        yield base, proc


def test_concurrent_requests_are_batched_and_deterministic(server):
    base, _ = server
    with httpx.Client(base_url=base, timeout=30) as c:
        solo = c.post("/v1/gan/sample", json={"n": 1, "seed": 123}).json()
        before = c.get("/metrics").text
    n_requests = 32

    def call(i: int) -> dict:
        with httpx.Client(base_url=base, timeout=30) as c:
            return c.post("/v1/gan/sample", json={"n": 1, "seed": 123 if i == 0 else 1000 + i}).json()

    with cf.ThreadPoolExecutor(n_requests) as pool:
        results = list(pool.map(call, range(n_requests)))
    after = httpx.get(base + "/metrics").text
    assert results[0]["images"] == solo["images"]            # same seed, same image, batched or not
    batches = (scrape(after, "genserve_batch_size_count", model="gan", graph="generator")
               - scrape(before, "genserve_batch_size_count", model="gan", graph="generator"))
    items = (scrape(after, "genserve_batch_size_sum", model="gan", graph="generator")
             - scrape(before, "genserve_batch_size_sum", model="gan", graph="generator"))
    assert items == n_requests
    assert batches < n_requests, f"{n_requests} concurrent requests ran as {batches} batches: nothing was merged"
    ok = scrape(after, "genserve_http_requests_total", route="/v1/gan/sample", status="200")
    assert ok >= n_requests + 1


def test_errors_over_http(server):
    base, _ = server
    r = httpx.post(base + "/v1/pixelcnn/logprob", content=b"[", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"
    assert httpx.get(base + "/v1/models/unknown").status_code == 404


def test_head_probes_over_http(server):
    base, _ = server
    with httpx.Client(base_url=base, timeout=10) as c:
        for path in ("/healthz", "/readyz"):
            r = c.head(path)  # then a GET on the same connection: a stray HEAD body would corrupt its framing
            assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0
            assert c.get(path).status_code == 200


def test_sighup_is_logged_and_ignored(server):
    """SIGHUP's default action would kill the server without draining; it is logged and the server serves on."""
    base, proc = server
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert proc.poll() is None
    assert httpx.post(base + "/v1/gan/sample", json={"n": 1, "seed": 1}, timeout=30).status_code == 200


def test_graceful_shutdown_finishes_accepted_work(server):
    base, proc = server
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, base + "/v1/pixelcnn/sample", json={"n": 2, "seed": 1}, timeout=60)
        time.sleep(0.3)                                        # the sample request is in flight
        proc.send_signal(signal.SIGTERM)
        r = pending.result()
    assert r.status_code == 200 and len(r.json()["images"]) == 2
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)    # uvicorn re-raises the signal after draining
