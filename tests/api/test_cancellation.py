"""A client that disconnects stops costing compute, shown over real HTTP.

PixelCNN: a real `python -m service` on the shipped models (their step times are the real ones), under both HTTP
parsers. Large sample requests are sent from raw sockets that are closed once their sequences are sampling, so the
TCP connection really drops; /metrics must then count them as cancelled, by stage, the sampler's step counter must
stop within a step, and the next small request must take what it takes on an idle server.

VAE: its batcher work takes milliseconds, too short to catch over HTTP, so the app runs in-process with its graph
calls held, and requests are driven through the ASGI interface with a receive() that reports the disconnect."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

import service.runtime
from tests.api.conftest import make_client, server_process, wait_ready
from tests.api.test_server_process import scrape

pytestmark = pytest.mark.slow

STORE = Path(__file__).resolve().parents[2] / "models_store"
MAX_ACTIVE = 64
ABANDONED, N = 6, 48  # the first request fills 48 slots, the second the other 16 and queues 32, the rest queue
SAMPLE = "/v1/pixelcnn/sample"


def steps(metrics: str) -> float:
    """Sampling steps run so far: the sampler observes the sequences sharing each step once."""
    return scrape(metrics, "genserve_sampler_active_sequences_count", model="pixelcnn")


def cancelled(metrics: str, stage: str, graph: str = "sampler") -> float:
    return scrape(metrics, "genserve_cancelled_total", model="pixelcnn", graph=graph, stage=stage)


def poll(base: str, until, timeout_s: float, what: str) -> str:
    """/metrics, fetched until `until(text)` holds; fails after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(base + "/metrics", timeout=5).text
        if until(text):
            return text
        time.sleep(0.05)
    pytest.fail(f"after {timeout_s} s: {what}")


def latency(base: str, repeats: int) -> float:
    """The least of `repeats` timings of a one-image sample (the least: the machine is shared and noisy)."""
    best = float("inf")
    with httpx.Client(base_url=base, timeout=60) as c:
        for i in range(repeats):
            t0 = time.perf_counter()
            r = c.post(SAMPLE, json={"n": 1, "seed": i})
            best = min(best, time.perf_counter() - t0)
            assert r.status_code == 200, r.text
    return best


def send_and_keep_open(port: int, body: dict) -> socket.socket:
    raw = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
              % (SAMPLE.encode(), len(raw), raw))
    return s


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(request, tmp_path_factory):
    log = tmp_path_factory.mktemp("cancel") / f"server-{request.param}.log"
    with server_process(STORE, log, http=request.param, sampler_max_active=str(MAX_ACTIVE)) as (base, _):
        yield base


def test_abandoned_samples_leave_the_sampler(server: str) -> None:
    base = server
    port = int(base.rsplit(":", 1)[1])
    idle_s = latency(base, 3)
    before = httpx.get(base + "/metrics").text
    socks = [send_and_keep_open(port, {"n": N, "seed": 100 + i}) for i in range(ABANDONED)]
    try:
        queued_sequences = ABANDONED * N - MAX_ACTIVE
        loaded = poll(base, lambda m: scrape(m, "genserve_queue_depth", model="pixelcnn", graph="sampler")
                      == queued_sequences and steps(m) - steps(before) >= 5, 30,
                      f"the {ABANDONED} requests never all reached the sampler")
    finally:
        for s in socks:
            s.close()                                          # the TCP connections drop
    closed_at = time.monotonic()
    base_cancelled = {stage: cancelled(before, stage) for stage in ("queued", "sampling")}
    after = poll(base, lambda m: sum(cancelled(m, s) - base_cancelled[s] for s in base_cancelled) >= ABANDONED, 5,
                 "the disconnects were not counted as cancellations")
    noticed_s = time.monotonic() - closed_at
    sampling = cancelled(after, "sampling") - base_cancelled["sampling"]
    queued = cancelled(after, "queued") - base_cancelled["queued"]
    # The two holding slots, and the queued ones; a queued request may reach the freed slots between two
    # disconnects being noticed (the server reads them one by one), and is then counted while sampling.
    assert sampling >= 2 and sampling + queued == ABANDONED, (sampling, queued)
    gone = (scrape(after, "genserve_http_requests_total", route=SAMPLE, status="499")
            - scrape(before, "genserve_http_requests_total", route=SAMPLE, status="499"))
    assert gone == ABANDONED
    assert scrape(after, "genserve_queue_depth", model="pixelcnn", graph="sampler") == 0
    # Idle within a step: at most the step in flight at the disconnect completes, over the next second.
    stopped_at = steps(after)
    quiet_until = time.monotonic() + 1.0
    while time.monotonic() < quiet_until:                      # bounded: one second of looking
        assert steps(httpx.get(base + "/metrics").text) <= stopped_at + 1
        time.sleep(0.1)
    # Far less than the work that was asked for: ABANDONED * N sequences of 784 steps, MAX_ACTIVE at a time.
    ran = stopped_at - steps(before)
    assert ran < 784, f"{ran} steps ran"
    after_s = latency(base, 3)  # the least of 3, like the idle figure
    # Were the abandoned sequences still sampling, this request would queue behind ~3 batches of 64 sequences
    # of 784 steps each, or share steps 64 wide: many times the idle latency, not within 2x of it.
    assert after_s < 2 * idle_s + 0.25, (f"n=1 took {after_s:.2f} s after the disconnects, {idle_s:.2f} s idle "
                                         f"(disconnects noticed in {noticed_s:.2f} s)")
    assert loaded  # the load was there: the queue depth and steps above were seen while the clients waited


# --- VAE: batcher work, held ------------------------------------------------------------------------


class HeldGraphs:
    """Every graph call of the app waits while `hold` is clear (bounded), and the decoder's batch sizes are kept."""

    def __init__(self) -> None:
        self.hold = threading.Event()
        self.hold.set()
        self.decoder_batches: list[int] = []
        self.entered = threading.Event()

    def wrap(self, session):
        run = ORIGINAL_SESSION_FN(session)
        is_decoder = [i.name for i in session.get_inputs()] == ["z"]

        def held(feeds):
            if is_decoder:
                self.decoder_batches.append(len(feeds["z"]))
            self.entered.set()
            assert self.hold.wait(10), "held graph call never released"
            return run(feeds)

        return held


ORIGINAL_SESSION_FN = service.runtime.session_fn


def asgi_request(path: str, body: dict) -> tuple[dict, bytes]:
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80)}
    return scope, raw


class Caller:
    """One ASGI request whose client disconnects when told to; records the status it was answered with."""

    def __init__(self, app, path: str, body: dict) -> None:
        self.scope, self.raw = asgi_request(path, body)
        self.app, self.gone, self.status = app, asyncio.Event(), None
        self.sent_body = False

    async def receive(self) -> dict:
        if not self.sent_body:
            self.sent_body = True
            return {"type": "http.request", "body": self.raw, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]

    def start(self) -> asyncio.Task:
        return asyncio.ensure_future(self.app(self.scope, self.receive, self.send))


def test_vae_requests_that_disconnect_are_dropped_or_finish_their_batch(monkeypatch) -> None:
    held = HeldGraphs()
    monkeypatch.setattr(service.runtime, "session_fn", held.wrap)
    # Batches of at most 64 with no delay: one computes, one full batch waits for the compute slot, the rest queue.
    # Requests of 64 images and more are watched for a disconnect (routes.common.WATCHED_ITEMS).
    with make_client(STORE, warmup=False, providers="cpu",
                     batching={"vae": {"max_batch_size": 64, "max_delay_ms": 0}}) as client:
        wait_ready(client)
        before = client.get("/metrics").text

        async def scenario() -> list[int | None]:
            callers = [Caller(client.app, "/v1/vae/sample", {"n": n, "seed": n}) for n in (64, 64, 96)]
            computing, next_batch, queued = callers
            held.hold.clear()
            async with asyncio.timeout(10):
                tasks = [computing.start()]
                while not held.entered.is_set():
                    await asyncio.sleep(0.005)
                tasks += [next_batch.start(), queued.start()]
                registry = client.app.state.registry
                decoder = registry.get("vae", None, family="vae").batchers["decoder"]
                while decoder.queue_depth < 160:               # both wait: 64 for the slot, 96 in the queue
                    await asyncio.sleep(0.005)
                queued.gone.set()
                computing.gone.set()
                while not (tasks[0].done() and tasks[2].done()):
                    await asyncio.sleep(0.005)
                held.hold.set()
                await asyncio.gather(*tasks)
            return [c.status for c in callers]

        statuses = client.portal.call(scenario)
        after = client.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return scrape(after, name, **labels) - scrape(before, name, **labels)

    # The two that left got no answer (499 in the request metrics); the one that stayed got its images.
    assert statuses == [None, 200, None]
    assert delta("genserve_http_requests_total", route="/v1/vae/sample", status="499") == 2
    assert delta("genserve_cancelled_total", model="vae", graph="decoder", stage="queued") == 1
    assert delta("genserve_cancelled_total", model="vae", graph="decoder", stage="computing") == 1
    # The batch computing at the disconnect finished; the queued request's 96 latents never reached ONNX Runtime.
    assert held.decoder_batches == [64, 64]
