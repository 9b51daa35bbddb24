"""The framework-free GAN server that bounds floor 2 (service/bench/bare.py) must do the route's real work:
the same seed gives the same labels and the same PNG bytes as POST /v1/gan/sample."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.bench.bare import BareGan
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
            a, b = mine.json(), theirs.json()
            assert (a["seed"], a["labels"], a["images"]) == (b["seed"], b["labels"], b["images"])
            assert len(a["images"]) == 1 and a["images"][0]
