"""Bad input gets a 4xx naming the field; overload and timeouts get 503/504; nothing answers 500."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from PIL import Image

from service import errors
from service.batcher import QueueFull
from tests.api.conftest import make_client, png_b64, wait_ready

ZERO = [[0] * 28 for _ in range(28)]


def _err(r, status: int, field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    if field is not None:
        assert field in [f["field"] for f in body.get("fields", [])], body
    return body


def test_malformed_json(client):
    _err(client.post("/v1/gan/sample", content=b"{nope", headers={"content-type": "application/json"}), 400, "body")


@pytest.mark.parametrize("body,field", [
    ({"n": "3"}, "n"), ({"n": 2.5}, "n"), ({"n": 0}, "n"), ({"n": 257}, "n"), ({"seed": -1}, "seed"),
    ({"labels": 10}, "labels"), ({"n": 2, "labels": [1, 2, 3]}, "labels"), ({"truncation": 0}, "truncation"),
    ({"format": "jpeg"}, "format"), ({"bogus": 1}, "bogus"), ({"model_version": 0}, "model_version"),
])
def test_gan_bad_fields(client, body, field):
    _err(client.post("/v1/gan/sample", json=body), 422, field)


def _png(size: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size), np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("image,fragment", [
    ("not base64!!", "base64"), (base64.b64encode(b"GIF89a....").decode(), "PNG"), (_png(32), "32x32"),
    ([[0] * 28] * 27, "27"), ([[256] * 28] * 28, "256"), ([[-1] * 28] * 28, "-1"), ([["a"] * 28] * 28, None), (7, None),
])
def test_bad_images_name_their_index(client, image, fragment):
    body = _err(client.post("/v1/vae/encode", json={"images": [ZERO, image]}), 422, "images[1]")
    if fragment:
        assert fragment in body["message"]


def test_too_many_images_and_empty_list(client):
    _err(client.post("/v1/pixelcnn/logprob", json={"images": [ZERO] * 257}), 422, "images")
    _err(client.post("/v1/pixelcnn/logprob", json={"images": []}), 422, "images")
    _err(client.post("/v1/pixelcnn/sample", json={"n": 65}), 422, "n")


def test_vae_field_errors(client):
    _err(client.post("/v1/vae/edit", json={"images": [ZERO], "edits": {"boldness": 1}}), 422, "edits.boldness")
    _err(client.post("/v1/vae/edit", json={"images": [ZERO], "edits": {"thickness": 9}}), 422, "edits.thickness")
    _err(client.post("/v1/vae/decode", json={"latents": [[0.0, 1.0]]}), 422, "latents[0]")
    _err(client.post("/v1/vae/interpolate", json={"start": ZERO, "end": "xx", "steps": 3}), 422, "end")
    _err(client.post("/v1/vae/interpolate", json={"start": ZERO, "end": ZERO, "steps": 1}), 422, "steps")
    _err(client.post("/v1/vae/interpolate", json={"start": ZERO, "end": ZERO, "method": "cubic"}), 422, "method")


def test_unknown_model_version_and_route(client):
    assert "version 7" in _err(client.post("/v1/gan/sample", json={"model_version": 7}), 404)["message"]
    _err(client.get("/v1/models/nothing"), 404)
    _err(client.get("/v1/nowhere"), 404)
    _err(client.get("/v1/vae/attributes?model_version=3"), 404)


def test_body_over_limit_is_413(tiny_store):
    with make_client(tiny_store, max_body_bytes=4096) as c:
        wait_ready(c)
        _err(c.post("/v1/vae/encode", json={"images": [png_b64(np.zeros((28, 28)))] * 40}), 413, "body")
        assert c.post("/v1/vae/encode", json={"images": [ZERO]}).status_code == 200


def test_streamed_body_over_limit_is_413(tiny_store):
    def chunks():  # no Content-Length: the limit trips while FastAPI reads the body
        yield b'{"images": ["'
        for _ in range(8):
            yield b"A" * 1024
        yield b'"]}'
    with make_client(tiny_store, max_body_bytes=4096) as c:
        wait_ready(c)
        for path in ("/v1/vae/encode", "/v1/gan/sample"):
            body = _err(c.post(path, content=chunks(), headers={"content-type": "application/json"}), 413, "body")
            assert body["code"] == "payload_too_large"
        r = c.post("/v2/models/vae.encoder/infer", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "exceeds 4096 bytes" in r.json()["error"]  # /v2 reads its body itself


@pytest.mark.parametrize("raw", [
    b'{"n": 1, "format": "\xff\xfe"}',                      # not UTF-8
    b'{"labels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # nested past Python's recursion limit
    b'{"n": ' + b"9" * 5000 + b"}",                           # int() refuses more than 4300 digits
])
def test_undecodable_json_is_400_malformed_json(client, raw):
    r = client.post("/v1/gan/sample", content=raw, headers={"content-type": "application/json"})
    assert _err(r, 400, "body")["code"] == "malformed_json"


def test_fields_are_named_as_the_client_wrote_them(client):
    r = client.post("/v1/gan/sample", json={"foo-bar": 1, "int": 2, "a[0]": 3})
    assert {f["field"] for f in _err(r, 422)["fields"]} == {"foo-bar", "int", "a[0]"}
    _err(client.post("/v1/vae/edit", json={"images": [ZERO], "edits": {"thick-ness": 50}}), 422, "edits.thick-ness")
    _err(client.post("/v1/gan/sample", json={"n": 2, "labels": [1, "x"]}), 422, "labels[1]")  # union tag dropped


def test_out_of_range_numbers_are_422_and_the_edges_pass(client):
    latent = len(client.post("/v1/vae/encode", json={"images": [ZERO]}).json()["latents"][0]["mean"])
    for big in (1.0001e4, 1e39):  # near float32's max the decoder's arithmetic overflows: a black image
        _err(client.post("/v1/vae/decode", json={"latents": [[big] + [0.0] * (latent - 1)]}), 422, "latents[0][0]")
    assert client.post("/v1/vae/decode", json={"latents": [[1e4] + [-1e4] * (latent - 1)]}).status_code == 200
    _err(client.post("/v1/pixelcnn/sample", json={"temperature": 1e-300}), 422, "temperature")
    _err(client.post("/v1/pixelcnn/sample", json={"temperature": 0.00099}), 422, "temperature")
    assert client.post("/v1/pixelcnn/sample", json={"temperature": 1e-3, "seed": 1}).status_code == 200
    _err(client.get("/v1/vae/attributes?model_version=0"), 422, "query.model_version")


def test_not_ready_while_loading_or_shutting_down_is_503(client):
    reg = client.app.state.registry
    reg.ready = False
    try:
        r = client.get("/v1/models/not-yet-loaded")
        assert _err(r, 503)["code"] == "not_ready" and r.headers["retry-after"] == "1"
        assert client.get("/v1/models/gan").status_code == 200  # one already loaded still answers
        assert client.head("/readyz").status_code == 503
        reg.stopping = True  # draining at shutdown: not ready either, but not because anything is loading
        assert _err(client.get("/v1/models/not-yet-loaded"), 503)["code"] == "shutting_down"
        assert _err(client.post("/v1/gan/sample", json={}), 503)["code"] == "shutting_down"
        assert client.get("/v2/health/ready").json() == {"error": "server is shutting down"}
    finally:
        reg.ready, reg.stopping = True, False
    _err(client.get("/v1/models/not-yet-loaded"), 404)


def test_queue_full_is_503_with_retry_after(tiny_store):
    with make_client(tiny_store, max_queue_items=4) as c:
        wait_ready(c)
        r = c.post("/v1/gan/sample", json={"n": 8})
        _err(r, 503)
        assert r.headers["retry-after"] == "1"
        text = c.get("/metrics").text
        assert 'genserve_rejections_total{graph="generator",model="gan",reason="queue_full",version="1"} 1.0' in text


def test_deadline_is_504(tiny_store):
    with make_client(tiny_store, request_timeout_s=1e-6) as c:
        wait_ready(c)
        _err(c.post("/v1/gan/sample", json={"n": 1}), 504)


def test_device_out_of_memory_is_503_with_retry_after(tiny_store):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    def out_of_memory(names, feeds):
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : bfc_arena.cc:360 void* onnxruntime::BFCArena::AllocateRawInternal"
                   "(size_t, bool, onnxruntime::Stream*) Failed to allocate memory for requested buffer of size 8")

    with make_client(tiny_store) as c:
        wait_ready(c)
        c.app.state.registry.get("gan").loaded.sessions["generator"].run = out_of_memory  # the session itself
        r = c.post("/v1/gan/sample", json={"n": 2})
        body = _err(r, 503)
        assert body["code"] == "resource_exhausted" and r.headers["retry-after"] == "1"
        assert "bfc_arena" not in r.text  # internals stay in the log


def test_device_out_of_memory_while_sampling_is_503(tiny_store):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    def out_of_memory(names, feeds):
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : CUBLAS failure 3: the resource allocation failed")

    with make_client(tiny_store) as c:
        wait_ready(c)
        for session in c.app.state.registry.get("pixelcnn").loaded.sessions.values():  # whichever the sampler calls
            session.run = out_of_memory
        r = c.post("/v1/pixelcnn/sample", json={"n": 1, "seed": 0})
        assert _err(r, 503)["code"] == "resource_exhausted"


# The OpenAPI document now refuses these bodies too (tests/unit/test_openapi.py); validation answers as before
@pytest.mark.parametrize("path,body,field", [
    ("/v1/gan/sample", {"labels": []}, "labels"),
    ("/v1/gan/sample", {"labels": [1] * 257}, "labels"),
    ("/v1/pixelcnn/sample", {"labels": [1] * 65}, "labels"),
    ("/v1/gan/sample", {"seed": 2**63}, "seed"),
    ("/v1/gan/sample", {"n": 2.0}, "n"),  # JSON Schema's integer admits 2.0, these strict types do not: documented
    ("/v1/vae/encode", {"images": [None]}, "images[0]"),
    ("/v1/vae/encode", {"images": [""]}, "images[0]"),
    ("/v1/vae/interpolate", {"start": None, "end": ZERO}, "start"),
    ("/v1/vae/decode", {"latents": [[]]}, "latents[0]"),
    ("/v1/vae/edit", {"images": [ZERO], "edits": {"": 1.0}}, "edits."),
])
def test_bodies_the_schema_refuses_name_their_field(client, path, body, field):
    _err(client.post(path, json=body), 422, field)


def test_the_largest_seed_the_schema_states_is_accepted(client):
    assert client.post("/v1/vae/sample", json={"seed": 2**63 - 1}).json()["seed"] == 2**63 - 1


# --- the table of service/errors.py ------------------------------------------------------------------------------

def test_an_exception_answers_by_the_nearest_class_in_its_hierarchy(caplog):
    class Busier(QueueFull):
        pass

    class Unforeseen(ValueError):  # a sibling of ImageDecodeError and TensorError, with no row of its own
        pass

    assert errors.reply(Busier("x")) == errors.reply(QueueFull("x")) == (
        503, "overloaded", "server is at capacity, retry later", None, {"Retry-After": "1"})
    assert errors.reply(HTTPException(404, "gone")).code == "not_found"  # FastAPI's subclass of Starlette's
    assert errors.reply(Unforeseen("secret")) == (500, "internal", "internal error", None, None)
    assert "unhandled error" in caplog.text and "secret" in caplog.text  # in the log, not in the answer


def test_a_new_row_is_answered_installed_and_documented(monkeypatch):
    class Teapot(Exception):
        pass

    monkeypatch.setitem(errors.ERRORS, Teapot, errors.Rule(503, "brewing", "short and stout", errors.RETRY_SOON))
    app = FastAPI()
    errors.install(app)

    @app.get("/v1/tea")
    @app.get("/v2/tea")
    def tea():
        raise Teapot("internal detail")

    with TestClient(app) as c:
        r = c.get("/v1/tea")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json() == {"error": {"code": "brewing", "message": "short and stout"}}
        assert c.get("/v2/tea").json() == {"error": "short and stout"}
    assert "brewing" in errors.responses(503)[503]["description"]


def test_install_registers_the_table_and_not_exception():
    app = FastAPI()
    errors.install(app)
    assert set(errors.ERRORS) <= set(app.exception_handlers)
    assert Exception not in app.exception_handlers  # see install(): the request gate answers those


def test_union_fields_are_found_through_the_request_body_base():
    assert errors.union_fields() == {"labels"}
