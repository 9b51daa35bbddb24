"""The framework-free GAN server that the bench sets beside floor 2 (bench/bare.py) must do the route's
real work: the same seed gives the same response bytes as POST /v1/gan/sample."""

from __future__ import annotations

import json
import urllib.request

from fastapi.testclient import TestClient

from bench.bare import BareGan
from bench.server import Server
from service.settings import Settings


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
