"""Readiness that means something: a bad version folder leaves the rest serving and ready; a required model with
no version serving keeps /readyz and /v2/health/ready at 503 (saying what is missing and why) while the other
models still answer; GENSERVE_REQUIRED_MODELS narrows what is required."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from service.store import printable
from tests.api.conftest import make_client, wait_ready


@pytest.fixture
def store(tiny_store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(tiny_store, dst)
    return dst


def _loaded(client: TestClient, timeout_s: float = 60.0) -> None:
    """Wait (bounded) until loading is over, ready or not."""
    deadline = time.monotonic() + timeout_s
    while not client.app.state.registry.ready:
        assert time.monotonic() < deadline, "loading never finished"
        time.sleep(0.05)


def _serves_every_model(client: TestClient) -> None:
    assert client.post("/v1/gan/sample", json={"n": 2, "seed": 1}).status_code == 200
    assert client.post("/v1/vae/sample", json={"n": 1, "seed": 1}).status_code == 200
    r = client.post("/v1/pixelcnn/logprob", json={"images": [[[0] * 28] * 28]})
    assert r.status_code == 200, r.text


def test_bad_version_folders_leave_every_model_serving_and_ready(store):
    (store / "gan/2").mkdir()
    (store / "gan/2/manifest.json").write_bytes(os.urandom(4096) + b"\xff")   # not UTF-8, not JSON
    shutil.copytree(store / "gan/1", store / "gan/²")                         # int('²') raises
    with make_client(store) as client:
        wait_ready(client)
        body = client.get("/readyz").json()
        assert body["ready"] is True and body["missing"] == {}
        assert body["models"] == {"gan": [1], "pixelcnn": [1], "vae": [1]}
        assert body["refused"] == sorted([str(store / "gan/2"), printable(str(store / "gan/²"))])
        assert client.get("/v2/health/ready").status_code == 200
        _serves_every_model(client)
        refused = {r["path"]: r["problems"] for r in client.get("/v1/models").json()["refused"]}
        assert refused[str(store / "gan/2")][0].startswith("manifest.json is not UTF-8 text")


@pytest.mark.parametrize("damage", ["truncated", "checksum"])
def test_a_required_model_with_nothing_serving_is_not_ready_and_says_why(store, damage):
    onnx = store / "gan/1/generator.onnx"
    if damage == "truncated":
        onnx.write_bytes(onnx.read_bytes()[:1000])
    else:
        manifest = json.loads((store / "gan/1/manifest.json").read_text())
        manifest["files"]["generator.onnx"]["sha256"] = "0" * 64
        (store / "gan/1/manifest.json").write_text(json.dumps(manifest))
    with make_client(store) as client:
        _loaded(client)
        r = client.get("/readyz")
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["ready"] is False and body["models"] == {"pixelcnn": [1], "vae": [1]}
        assert body["refused"] == [str(store / "gan/1")] and list(body["missing"]) == ["gan"]
        (why,) = body["missing"]["gan"]
        assert why.startswith(f"{store / 'gan/1'}: file 'generator.onnx' sha256 is"), why
        assert client.head("/readyz").status_code == 503
        r = client.get("/v2/health/ready")
        assert r.status_code == 503 and "gan" in r.json()["error"]
        # not ready as a whole, but the models that loaded serve
        assert client.post("/v1/vae/sample", json={"n": 1, "seed": 1}).status_code == 200
        assert client.post("/v1/gan/sample", json={"n": 1}).status_code == 404


def test_required_models_narrow_readiness(store, monkeypatch):
    (store / "gan/1/generator.onnx").write_bytes(b"\0" * 100)
    with make_client(store, required_models=["pixelcnn", "vae"]) as client:
        wait_ready(client)
        assert client.get("/readyz").json()["missing"] == {}
        assert client.get("/v2/health/ready").status_code == 200
    monkeypatch.setenv("GENSERVE_REQUIRED_MODELS", '["gan", "vae"]')   # as a deployment sets it
    with make_client(store) as client:
        _loaded(client)
        body = client.get("/readyz").json()
        assert body["ready"] is False and list(body["missing"]) == ["gan"]


def test_readers_never_see_a_half_built_registry(store, monkeypatch):
    """/readyz, /v1/models and /v2/repository/index asked again and again while a slowed loader sets up one version
    after another: never a 5xx other than /readyz's 503, and every answer shows no model or all of them."""
    from service import runtime

    real = runtime.ModelVersion

    def slow_model_version(*args, **kwargs):
        time.sleep(0.3)  # on the loading thread: the set-up of each version takes a while
        return real(*args, **kwargs)
    monkeypatch.setattr(runtime, "ModelVersion", slow_model_version)
    every = {"gan": [1], "pixelcnn": [1], "vae": [1]}
    v2_names = ["gan.generator", "pixelcnn.hrow", "pixelcnn.hstep", "pixelcnn.logprob", "pixelcnn.vstack",
                "pixelcnn.vstep", "vae.decoder", "vae.encoder"]
    seen: dict[str, list[tuple[int, object]]] = {"/readyz": [], "/v1/models": [], "/v2/repository/index": []}

    def ask(client: TestClient, path: str) -> None:
        while True:
            ready = client.app.state.registry.ready  # read before asking: the last answers come from a ready set
            r = client.post(path) if path.startswith("/v2") else client.get(path)
            seen[path].append((r.status_code, r.json()))
            if ready:
                return

    with make_client(store, warmup=False) as client:
        with ThreadPoolExecutor(len(seen)) as pool:
            for f in [pool.submit(ask, client, path) for path in seen]:
                f.result(timeout=120)
    loading = [body for status, body in seen["/readyz"] if status == 503]
    assert len(loading) >= 3, "loading was over before the readers could look"
    for status, body in seen["/readyz"]:
        assert status in (200, 503) and body["models"] in ({}, every), (status, body)
        assert body["ready"] is (status == 200) is (body["models"] == every)
    for status, body in seen["/v1/models"]:
        assert status == 200 and [m["name"] for m in body["models"]] in ([], sorted(every)), body
    for status, body in seen["/v2/repository/index"]:
        assert status == 200 and sorted(m["name"] for m in body) in ([], v2_names), body
        assert {m["state"] for m in body} <= {"READY"}, body
    assert seen["/readyz"][-1][0] == 200 and seen["/v2/repository/index"][-1][1] != []
