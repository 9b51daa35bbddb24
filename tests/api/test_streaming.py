"""POST /v1/pixelcnn/sample as server-sent events (Accept: text/event-stream).

In-process (tiny store): refusals stay plain JSON with their status; the streamed result is the plain response;
a failure after the first byte is an error event. Over a real `python -m service` process (shipped store, slow):
progress arrives while the sample is drawn (the first event while the request is still in flight: arrival times
would say little on a loaded machine), the result equals the plain response, and a client that leaves mid-stream
takes its sequences out of the sampler."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from genserve_client.client import _EventParser
from tests.api.conftest import make_client, server_process, wait_ready
from tests.api.test_server_process import scrape
from tests.conftest import REPO

EVENTS = {"accept": "text/event-stream"}
SAMPLE = "/v1/pixelcnn/sample"
PIXELS = 28 * 28


def events_of(text: str) -> list[tuple[str, dict]]:
    """(name, data as JSON) of each event of a whole stream; comment lines skipped."""
    parser = _EventParser()
    return [(name, json.loads(data)) for line in text.split("\n") if (e := parser.feed(line)) for name, data in [e]]


# --- in-process -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tiny_store):
    """The tiny store with room for 2 active and 2 queued sequences: n = 5 is refused at once."""
    with make_client(tiny_store, sampler_max_active=2, sampler_max_queue=2, sse_progress_interval_s=0.01) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize("body, status, code", [
    ({"n": 2, "temperature": 5.0}, 422, "invalid_request"),
    ({"n": 2, "preview": "yes"}, 422, "invalid_request"),
    ({"n": 2, "model_version": 99}, 404, "not_found"),
    ({"n": 5}, 503, "overloaded"),
])
def test_refusals_stay_plain_json(small, body, status, code):
    r = small.post(SAMPLE, json=body, headers=EVENTS)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and r.json()["error"]["code"] == code


def test_malformed_body_stays_plain_json(small):
    r = small.post(SAMPLE, content=b"{", headers={**EVENTS, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"


@pytest.mark.parametrize("fmt", ["png", "array"])
def test_streamed_result_is_the_plain_response(small, fmt):
    body = {"n": 2, "seed": 21, "labels": [4, 7], "format": fmt, "preview": True}
    plain = small.post(SAMPLE, json=body)
    streamed = small.post(SAMPLE, json=body, headers={"accept": "application/json;q=0.5, text/event-stream"})
    assert plain.status_code == streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.headers["cache-control"] == "no-cache" and streamed.headers["x-accel-buffering"] == "no"
    events = events_of(streamed.text)
    names = [name for name, _ in events]
    assert names[0] == "progress" and names[-1] == "result" and set(names[:-1]) == {"progress"}
    assert events[-1][1] == plain.json()
    result_line = next(line for line in streamed.text.split("\n") if line.startswith("data: {\"model\""))
    assert result_line.removeprefix("data: ").encode() == plain.content      # the same bytes, on one line
    for _, data in events[:-1]:
        assert data["pixels_total"] == 2 * PIXELS and len(data["preview"]) == 2


def test_a_failure_after_the_first_byte_is_an_error_event(small):
    mv = small.app.state.registry.get("pixelcnn")

    def broken(feeds):
        raise RuntimeError("the graph failed")

    pixel_graph, mv.sampler.stepper.pixel_graph = mv.sampler.stepper.pixel_graph, broken
    try:
        r = small.post(SAMPLE, json={"n": 1, "seed": 1}, headers=EVENTS)
    finally:
        mv.sampler.stepper.pixel_graph = pixel_graph
    assert r.status_code == 200
    events = events_of(r.text)
    assert [name for name, _ in events] == ["progress", "error"]
    assert events[-1][1] == {"status": 500, "error": {"code": "internal", "message": "internal error"}}
    assert small.post(SAMPLE, json={"n": 1, "seed": 1}).status_code == 200   # the sampler serves on


# --- a real server ----------------------------------------------------------------------------------------------

INTERVAL_S = 0.05


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("streaming") / "server.log"
    with server_process(REPO / "models_store", log, warmup="false", providers="cpu",
                        sse_progress_interval_s=str(INTERVAL_S)) as (base, _):
        yield base


def metric(base: str, name: str, **labels: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    if not labels:                                  # a series without labels: `name value`
        return sum(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))
    return scrape(text, name, **labels)


def streamed_events(r: httpx.Response) -> Iterator[tuple[str, dict]]:
    """(name, data) of each event as it arrives."""
    parser = _EventParser()
    for line in r.iter_lines():
        if (e := parser.feed(line)) is not None:
            yield e[0], json.loads(e[1])


@pytest.mark.slow
def test_streamed_sample_reports_progress_then_the_plain_result(server):
    body = {"n": 2, "seed": 5, "labels": [3, 8]}
    plain = httpx.post(server + SAMPLE, json=body, timeout=60)
    assert plain.status_code == 200
    started = time.monotonic()
    with httpx.stream("POST", server + SAMPLE, json=body, headers=EVENTS, timeout=60) as r:
        assert r.status_code == 200 and r.headers["x-accel-buffering"] == "no"
        received = list(streamed_events(r))
    duration = time.monotonic() - started
    names = [name for name, _ in received]
    progress = [data["pixels_done"] for name, data in received if name == "progress"]
    assert names[-1] == "result" and names.count("result") == 1 and set(names[:-1]) == {"progress"}
    assert len(progress) >= 3, f"{len(progress)} progress events in {duration:.2f} s"
    assert len(progress) <= duration / INTERVAL_S + 2, "progress more often than GENSERVE_SSE_PROGRESS_INTERVAL_S"
    assert progress == sorted(set(progress)) and progress[-1] <= 2 * PIXELS
    assert received[-1][1] == plain.json()          # same seed: the same images, byte for byte


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_stops_its_sampling(server):
    labels = {"model": "pixelcnn", "graph": "sampler"}
    cancelled_before = metric(server, "genserve_cancelled_total", stage="sampling", **labels)
    steps_before = metric(server, "genserve_sampler_active_sequences_count", **labels)
    left_before = metric(server, "genserve_http_requests_total", route=SAMPLE, status="499")
    with httpx.stream("POST", server + SAMPLE, json={"n": 16, "seed": 9}, headers=EVENTS, timeout=60) as r:
        for name, data in streamed_events(r):
            assert name == "progress"
            if data["pixels_done"] == 0:           # the first event came while the request was in flight
                assert metric(server, "genserve_inflight_requests") == 1
            else:
                break                          # sampling under way: leave (the connection closes)
    deadline = time.monotonic() + 10
    while metric(server, "genserve_cancelled_total", stage="sampling", **labels) == cancelled_before:
        assert time.monotonic() < deadline, "the abandoned stream was never counted as cancelled while sampling"
        time.sleep(0.05)
    # The sampler's step count stops growing: two reads a few steps' time apart agree (bounded).
    deadline = time.monotonic() + 2
    steps = metric(server, "genserve_sampler_active_sequences_count", **labels)
    while True:
        time.sleep(0.1)
        now = metric(server, "genserve_sampler_active_sequences_count", **labels)
        if now == steps:
            break
        assert time.monotonic() < deadline, "the sampler kept stepping after the client left"
        steps = now
    assert steps - steps_before < PIXELS, "the sampler finished the request nobody was reading"
    assert metric(server, "genserve_http_requests_total", route=SAMPLE, status="499") == left_before + 1
    assert metric(server, "genserve_inflight_requests") == 0
