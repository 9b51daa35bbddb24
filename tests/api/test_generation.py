"""The /v1 model endpoints on the tiny store, in-process: shapes, determinism, and agreement with the graphs."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import onnxruntime as ort
import pytest

from service.sampler import sample_fast, session_fn
from service.schemas import PIXELCNN_GUIDANCE
from service.store import read_manifest
from tests.api.conftest import make_client, png_array, png_b64, wait_for, wait_ready


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["models"] == {"gan": [1], "pixelcnn": [1], "vae": [1]}


def test_gan_sample_is_deterministic_and_labelled(client):
    body = {"n": 3, "seed": 42, "labels": [1, 7, 7]}
    a, b = client.post("/v1/gan/sample", json=body).json(), client.post("/v1/gan/sample", json=body).json()
    assert a == b and a["seed"] == 42 and a["labels"] == [1, 7, 7] and len(a["images"]) == 3
    assert (a["model"], a["model_version"]) == ("gan", 1)
    assert png_array(a["images"][0]).shape == (28, 28)
    other = client.post("/v1/gan/sample", json={**body, "seed": 43}).json()
    assert other["images"] != a["images"]


def test_gan_sample_defaults_and_array_format(client):
    r = client.post("/v1/gan/sample", json={"format": "array"}).json()
    img = np.asarray(r["images"][0])
    assert img.shape == (28, 28) and img.min() >= 0 and img.max() <= 255
    assert isinstance(r["seed"], int) and 0 <= r["labels"][0] <= 9
    same = client.post("/v1/gan/sample", json={"format": "array", "seed": r["seed"]}).json()
    assert same["images"] == r["images"]                   # the returned seed reproduces the request


def test_gan_single_label_and_truncation(client):
    r = client.post("/v1/gan/sample", json={"n": 4, "labels": 3, "seed": 1, "truncation": 0.5}).json()
    assert r["labels"] == [3, 3, 3, 3]
    full = client.post("/v1/gan/sample", json={"n": 4, "labels": 3, "seed": 1}).json()
    assert full["images"] != r["images"]


def test_vae_encode_decode_round_trip(client, digit_images):
    enc = client.post("/v1/vae/encode", json={"images": [png_b64(x) for x in digit_images]}).json()
    assert len(enc["latents"]) == 4
    d = len(enc["latents"][0]["mean"])
    assert all(len(lat["std"]) == d and min(lat["std"]) > 0 for lat in enc["latents"])
    # arrays and PNGs are the same image
    enc2 = client.post("/v1/vae/encode", json={"images": [x.tolist() for x in digit_images]}).json()
    assert np.allclose([lat["mean"] for lat in enc["latents"]], [lat["mean"] for lat in enc2["latents"]])
    dec = client.post("/v1/vae/decode", json={"latents": [lat["mean"] for lat in enc["latents"]],
                                               "format": "array"}).json()
    assert np.asarray(dec["images"]).shape == (4, 28, 28)


def test_vae_sample_deterministic(client):
    a = client.post("/v1/vae/sample", json={"n": 2, "seed": 9}).json()
    assert a == client.post("/v1/vae/sample", json={"n": 2, "seed": 9}).json() and len(a["images"]) == 2


def test_vae_attributes_and_edit(client, tiny_store, digit_images):
    attrs = client.get("/v1/vae/attributes").json()["attributes"]
    assert {a["name"] for a in attrs} == {"thickness", "slant"} and all(a["std"] > 0 for a in attrs)
    imgs = [x.tolist() for x in digit_images[:2]]
    means = [lat["mean"] for lat in client.post("/v1/vae/encode", json={"images": imgs}).json()["latents"]]
    zero = client.post("/v1/vae/edit", json={"images": imgs, "edits": {"thickness": 0.0}, "format": "array"}).json()
    recon = client.post("/v1/vae/decode", json={"latents": means, "format": "array"}).json()
    assert zero["images"] == recon["images"]               # strength 0 is a plain reconstruction
    # an edit is exactly: decode(mean + sum of strength * direction)
    directions = read_manifest(tiny_store / "vae/1").attributes
    shift = 3.0 * np.asarray(directions["thickness"].direction) - 2.0 * np.asarray(directions["slant"].direction)
    moved = client.post("/v1/vae/edit", json={"images": imgs, "edits": {"thickness": 3.0, "slant": -2.0},
                                              "format": "array"}).json()
    want = client.post("/v1/vae/decode", json={"latents": (np.asarray(means) + shift).tolist(),
                                                "format": "array"}).json()
    assert np.abs(np.asarray(moved["images"]) - np.asarray(want["images"])).max() <= 1   # float32 rounding


def test_vae_interpolate(client, digit_images):
    a, b = digit_images[0].tolist(), png_b64(digit_images[1])
    for method in ("slerp", "lerp"):
        r = client.post("/v1/vae/interpolate", json={"start": a, "end": b, "steps": 5, "method": method,
                                                       "format": "array"}).json()
        assert np.asarray(r["images"]).shape == (5, 28, 28)
    enc = client.post("/v1/vae/encode", json={"images": [a]}).json()
    first = client.post("/v1/vae/decode", json={"latents": [enc["latents"][0]["mean"]], "format": "array"}).json()
    assert r["images"][0] == first["images"][0]           # the path starts at the start image's latent


def test_pixelcnn_logprob_matches_the_graph(client, tiny_store, digit_images):
    r = client.post("/v1/pixelcnn/logprob", json={"images": [x.tolist() for x in digit_images],
                                                   "per_pixel": True}).json()["results"]
    sess = ort.InferenceSession(str(tiny_store / "pixelcnn/1/logprob.onnx"), providers=["CPUExecutionProvider"])
    (ref,) = sess.run(None, {"image": digit_images[:, None].astype(np.float32), "label": np.full(4, 10)})
    for i, res in enumerate(r):
        assert math.isclose(res["logprob"], float(ref[i].astype(np.float64).sum()), rel_tol=1e-6)
        assert math.isclose(res["bits_per_dim"], -res["logprob"] / (784 * math.log(2)), rel_tol=1e-9)
        assert np.allclose(np.asarray(res["per_pixel"]), ref[i], atol=1e-6) and res["logprob"] < 0
    plain = client.post("/v1/pixelcnn/logprob", json={"images": [digit_images[0].tolist()]}).json()["results"][0]
    assert "per_pixel" not in plain or plain["per_pixel"] is None


def test_pixelcnn_sample_matches_the_reference_sampler(client, tiny_store):
    r = client.post("/v1/pixelcnn/sample", json={"n": 2, "seed": 5, "labels": [4, 8], "temperature": 0.8,
                                                  "format": "array"}).json()
    assert r["labels"] == [4, 8]
    sess = {g: ort.InferenceSession(str(tiny_store / f"pixelcnn/1/{g}.onnx"), providers=["CPUExecutionProvider"])
            for g in ("vstack", "hrow")}
    u = np.random.default_rng(5).random((2, 784))
    # no guidance in the request: the documented default weight
    ref = sample_fast(session_fn(sess["vstack"]), session_fn(sess["hrow"]), np.array([4, 8]), u, 0.8,
                      PIXELCNN_GUIDANCE, any_label=10)
    assert np.array_equal(np.asarray(r["images"]), ref)


def test_models_listing(client):
    models = client.get("/v1/models").json()
    assert [m["name"] for m in models["models"]] == ["gan", "pixelcnn", "vae"] and models["refused"] == []
    gan = models["models"][0]
    assert gan["provider"] == "CPUExecutionProvider" and gan["default_version"] == 1
    assert gan["graphs"]["generator"]["inputs"][0]["name"] == "z" and "conditional_accuracy" in gan["metrics"]
    detail = client.get("/v1/models/vae").json()
    v1 = detail["details"]["1"]
    assert v1["batching"]["max_batch_size"] >= 1 and "thickness" in v1["attributes"]


def test_models_listing_reports_the_process_memory_and_each_versions_cold_start(client):
    process = client.get("/v1/models").json()["process"]
    assert process["pid"] == os.getpid()  # in-process: the test's own
    assert process["rss_bytes"] > 0 and process["rss_peak_bytes"] >= process["rss_bytes"]
    assert process["rss_anon_bytes"] + process["rss_file_bytes"] + process["rss_shmem_bytes"] == process["rss_bytes"]
    assert process["startup"]["before_loading_s"] <= process["startup"]["ready_s"]
    assert process["release"]["idle_s"] == 5.0 and process["release"]["target_mib"] == 256.0
    assert process["release"]["releases"] >= 1  # once after warm-up
    assert sorted(process["models"]) == ["gan", "pixelcnn", "vae"]
    pixelcnn = process["models"]["pixelcnn"]["1"]
    assert set(pixelcnn["graphs"]) == {"logprob", "vstack", "hrow", "vstep", "hstep"}
    warm = sum(g["warmup"]["seconds"] for g in pixelcnn["graphs"].values())
    assert pixelcnn["cold_start_s"] == pytest.approx(pixelcnn["load"]["seconds"] + warm, abs=2e-3)
    assert pixelcnn["load"]["seconds"] >= sum(g["session"]["seconds"] for g in pixelcnn["graphs"].values()) - 2e-3



def test_memory_over_the_target_goes_back_at_the_first_pause(tiny_store):
    """With the idle release an hour away and a target every process is over (1 MiB), a call is followed by a
    release as soon as ONNX Runtime has paused a quarter second, once RSS has grown past what the last release
    left (here by 64 MiB of touched ballast); without that growth, calls do not release."""
    with make_client(tiny_store, memory_release_idle_s=3600, memory_target_mib=1) as c:
        wait_ready(c)
        process = lambda: c.get("/v1/models").json()["process"]  # noqa: E731
        releases = process()["release"]["releases"]
        assert c.post("/v1/gan/sample", json={"n": 2, "seed": 1}).status_code == 200
        time.sleep(1.0)
        assert process()["release"]["releases"] == releases  # no growth: the models alone are over the target
        ballast = np.ones(64 * 2**20 // 8)  # touched: resident
        assert c.post("/v1/gan/sample", json={"n": 2, "seed": 1}).status_code == 200
        wait_for("a release after the call", lambda: process()["release"]["releases"] > releases, timeout_s=10)
        del ballast

def test_metrics_endpoint(client):
    client.post("/v1/gan/sample", json={"n": 2})
    text = client.get("/metrics").text
    for name in ("genserve_http_requests_total", "genserve_batch_size_bucket", "genserve_queue_wait_seconds",
                 "genserve_compute_seconds", "genserve_queue_depth", "genserve_items_processed_total",
                 "genserve_model_info"):
        assert name in text, name
    assert 'route="/v1/gan/sample"' in text and 'provider="CPUExecutionProvider"' in text


def test_docs_work_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "cdn" not in page.text.lower()
    src = page.text.split('src="')[1].split('"')[0] if 'src="' in page.text else None
    assert src and client.get(src).status_code == 200
    assert client.get("/openapi.json").json()["info"]["title"] == "genserve"
