"""/v1 routes: a POST takes its fields from the JSON body only (a query parameter is refused, not ignored), and a
large request's image work runs in a worker thread while a small one's stays on the event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.families import pixelcnn
from service.routes import common
from tests.api.conftest import png_b64

ZERO = [[0] * 28 for _ in range(28)]


def v1_posts(client) -> list[str]:
    return sorted(path for path, ops in client.app.openapi()["paths"].items()
                  if path.startswith("/v1/") and "post" in ops)


def test_model_version_in_the_query_of_a_post_is_422_not_ignored(client):
    r = client.post("/v1/gan/sample?model_version=7", json={"seed": 1})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    assert [f["field"] for f in err["fields"]] == ["query.model_version"]
    assert "JSON body" in err["fields"][0]["message"]


# A valid body for each /v1 POST: the query is what is wrong (with a bad body too, the body's errors come first).
VALID = {"/v1/gan/sample": {}, "/v1/pixelcnn/logprob": {"images": [ZERO]}, "/v1/pixelcnn/sample": {"n": 1},
         "/v1/vae/encode": {"images": [ZERO]}, "/v1/vae/decode": {"latents": [[0.0] * 16]},
         "/v1/vae/sample": {},
         "/v1/vae/edit": {"images": [ZERO], "edits": {"slant": 1.0}},
         "/v1/vae/interpolate": {"start": ZERO, "end": ZERO},
         "/v1/pixelcnn/complete": {"image": ZERO, "known_rows": 14},
         "/v1/pixelcnn/anomaly": {"images": [ZERO]}}


def test_every_v1_post_refuses_every_query_parameter(client):
    paths = v1_posts(client)
    assert paths == sorted(VALID)
    for path in paths:
        r = client.post(f"{path}?seed=3&x=1&x=2", json=VALID[path])
        assert r.status_code == 422, (path, r.text)
        assert [f["field"] for f in r.json()["error"]["fields"]] == ["query.seed", "query.x"], path


def test_gets_keep_their_query_and_posts_their_body_version(client):
    assert client.get("/v1/vae/attributes?model_version=1").status_code == 200
    r = client.post("/v1/gan/sample", json={"seed": 1, "model_version": 1})
    assert r.status_code == 200 and r.json()["model_version"] == 1


@pytest.fixture
def where(monkeypatch):
    """Patches `module.name` with a wrapper that records, per call, whether it ran on the event loop's thread
    (a running loop there) or in a worker thread; returns the list of (thread id, on the loop) it fills."""
    calls: list[tuple[int, bool]] = []

    def patch(module, name: str):
        real = getattr(module, name)

        def recorded(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop = True
            except RuntimeError:
                on_loop = False
            calls.append((threading.get_ident(), on_loop))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, recorded)
        return calls
    return patch


def test_large_decode_runs_off_the_loop_and_a_small_one_on_it(client, where, digit_images):
    calls = where(common, "decode_images")
    image = png_b64(digit_images[0])
    for n in (1, common.OFFLOAD_DECODE_IMAGES - 1, common.OFFLOAD_DECODE_IMAGES):
        r = client.post("/v1/vae/encode", json={"images": [image] * n})
        assert r.status_code == 200 and len(r.json()["latents"]) == n
    (loop_thread, small), (same_thread, below), (other_thread, large) = calls
    assert small and below and not large
    assert same_thread == loop_thread != other_thread


def test_large_encode_runs_off_the_loop_and_a_small_one_on_it(client, where):
    calls = where(common, "encode_images")
    for n in (1, common.OFFLOAD_ENCODE_IMAGES):
        r = client.post("/v1/gan/sample", json={"seed": 3, "n": n, "format": "array"})
        assert r.status_code == 200 and len(r.json()["images"]) == n
    (loop_thread, small), (other_thread, large) = calls
    assert small and not large and loop_thread != other_thread


def test_large_per_pixel_maps_are_serialised_off_the_loop(client, where):
    calls = where(pixelcnn, "logprob_results")
    n = common.OFFLOAD_PER_PIXEL_MAPS
    for per_pixel, count in ((True, 1), (False, n), (True, n)):
        r = client.post("/v1/pixelcnn/logprob", json={"images": [ZERO] * count, "per_pixel": per_pixel})
        assert r.status_code == 200 and len(r.json()["results"]) == count
        assert ("per_pixel" in r.json()["results"][0]) is per_pixel
    assert [on_loop for _, on_loop in calls] == [True, True, False]


def test_the_same_reply_whether_encoded_on_the_loop_or_off_it(client, monkeypatch):
    body = {"seed": 11, "n": common.OFFLOAD_ENCODE_IMAGES, "labels": 4}
    threaded = client.post("/v1/gan/sample", json=body)
    monkeypatch.setattr(common, "OFFLOAD_ENCODE_IMAGES", common.OFFLOAD_ENCODE_IMAGES + 1)
    inline = client.post("/v1/gan/sample", json=body)
    assert threaded.status_code == inline.status_code == 200
    assert threaded.content == inline.content and threaded.headers["content-type"] == inline.headers["content-type"]
