"""The servers the bench sets beside the service must do the routes' real work: the framework-free GAN server
of floor 2 (bench/bare.py) gives the same response bytes as POST /v1/gan/sample for the same seed, and the
LitServe peer of the litserve scenario (bench/litserve_peer.py) the same images and log-likelihoods."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest
from fastapi.testclient import TestClient

from bench.bare import BareGan
from bench.litserve_peer import GanSample, Logprob
from bench.server import Server
from service.settings import Settings
from tests.api.conftest import png_b64


def test_bare_server_answers_like_the_service(client, tiny_store):
    with TestClient(BareGan(Settings(store_path=tiny_store))) as bare:
        ready = bare.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert bare.get("/healthz").json() == {"status": "ok"}
        assert bare.get("/nowhere").status_code == 404
        for seed in (0, 7, 2**40):
            mine = bare.post("/v1/gan/sample", json={"n": 1, "seed": seed})
            theirs = client.post("/v1/gan/sample", json={"n": 1, "seed": seed})
            assert mine.status_code == theirs.status_code == 200
            assert mine.content == theirs.content and len(mine.json()["images"]) == 1
            assert mine.headers["content-length"] == str(len(mine.content))


def test_bench_starts_it_as_one_process_whatever_the_environment(tiny_store, monkeypatch):
    monkeypatch.setenv("GENSERVE_WORKERS", "2")  # the service's setting must not make the bench wait for 2 pids
    with Server(tiny_store, ready_timeout_s=60, module="bench.bare", workers=1) as srv:
        req = urllib.request.Request(srv.base + "/v1/gan/sample", data=json.dumps({"seed": 3}).encode(),
                                     method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and json.loads(r.read())["seed"] == 3


def through_litserve_hooks(api, requests: list[dict]) -> list[dict]:
    """The requests as one batch through the LitAPI's hooks, in the order LitServe's batched loop calls them."""
    outputs = api.unbatch(api.predict(api.batch([api.decode_request(r) for r in requests])))
    return [api.encode_response(o) for o in outputs]


def test_litserve_peer_answers_like_the_service(client, tiny_store, digit_images):
    settings = Settings(store_path=tiny_store)
    gan, logprob = GanSample(settings), Logprob(settings)
    gan.setup("cpu")
    logprob.setup("cpu")
    assert gan.max_batch_size == logprob.max_batch_size == 64  # the manifests' batching, LitServe's batches

    seeds = [0, 7, 2**40]
    for seed, mine in zip(seeds, through_litserve_hooks(gan, [{"n": 1, "seed": s} for s in seeds]), strict=True):
        theirs = client.post("/v1/gan/sample", json={"n": 1, "seed": seed})
        assert theirs.status_code == 200
        assert mine == theirs.json()  # model, version, seed, label and the PNG's very bytes (base64)

    bodies = [{"images": [png_b64(image)]} for image in digit_images]
    for body, mine in zip(bodies, through_litserve_hooks(logprob, bodies), strict=True):
        theirs = client.post("/v1/pixelcnn/logprob", json=body).json()
        assert {k: mine[k] for k in ("model", "model_version")} == {k: theirs[k] for k in ("model", "model_version")}
        (m,), (t,) = mine["results"], theirs["results"]
        assert set(m) == set(t) == {"logprob", "bits_per_dim"}
        # Batches of other sizes may sum in another order: equal to float32 rounding, not bit for bit.
        assert m["logprob"] == pytest.approx(t["logprob"], rel=1e-5)
        assert m["bits_per_dim"] == pytest.approx(t["bits_per_dim"], rel=1e-5)


def descendants(pid: int) -> set[int]:
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(entry)] = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    out, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        children = [c for c, p in parents.items() if p == parent]
        out.update(children)
        frontier += children
    return out


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited child that its new parent has not reaped yet)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_litserve_peer_serves_as_a_process_and_leaves_none_behind(tiny_store):
    with Server(tiny_store, ready_timeout_s=120, module="bench.litserve_peer", workers=1) as srv:
        req = urllib.request.Request(srv.base + "/v1/gan/sample", data=json.dumps({"seed": 3}).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and json.loads(r.read())["seed"] == 3
        workers = descendants(srv.proc.pid)
        assert len(workers) >= 3  # an HTTP process and an inference worker per endpoint, at least
    assert srv.proc.returncode is not None
    deadline = time.monotonic() + 10  # multiprocessing's resource tracker exits once it sees the server gone
    while (left := [p for p in workers if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, "LitServe processes outlived the server"
