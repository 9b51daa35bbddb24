"""Classifier-free guidance through POST /v1/pixelcnn/sample.

In-process on the tiny store: `guidance: 0` is today's sampling, image for image (the single-batch reference on the
served graphs); a guided request gives the guided reference's images; bad weights are a 422 naming the field.
Over a real `python -m service` on the shipped store (slow): guided and unguided requests sent together share every
sampling step (one graph call serves both) and give the images each gets alone."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from service.sampler import sample_fast, session_fn
from tests.api.conftest import make_client, server_process, wait_ready
from tests.api.test_server_process import scrape
from tests.conftest import REPO

SAMPLE = "/v1/pixelcnn/sample"


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def reference(version_dir, labels: list[int], seed: int, guidance: float) -> np.ndarray:
    """What the served version must draw: sample_fast on its own graphs, uniforms from the seed as the service
    draws them (service.families.pixelcnn.uniforms)."""
    graphs = [session_fn(ort.InferenceSession(str(version_dir / f"{g}.onnx"), providers=["CPUExecutionProvider"]))
              for g in ("vstack", "hrow")]
    u = np.random.default_rng(seed).random((len(labels), 28 * 28))
    return sample_fast(*graphs, np.array(labels), u, 1.0, guidance, any_label=10)


@pytest.fixture(scope="module")
def client(tiny_store):
    with make_client(tiny_store) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_sample_draws_the_reference_images(client, tiny_store, guidance):
    r = client.post(SAMPLE, json={"n": 2, "seed": 4, "labels": [3, 8], "guidance": guidance})
    assert r.status_code == 200, r.text
    got = np.stack([pixels(b) for b in r.json()["images"]])
    np.testing.assert_array_equal(got, reference(tiny_store / "pixelcnn" / "1", [3, 8], 4, guidance))


@pytest.mark.parametrize("guidance", [-1, 20.5, "strong", None])
def test_bad_guidance_is_a_422_naming_the_field(client, guidance):
    r = client.post(SAMPLE, json={"n": 1, "guidance": guidance})
    assert r.status_code == 422, r.text
    assert [f["field"] for f in r.json()["error"]["fields"]] == ["guidance"], r.text


@pytest.mark.slow
def test_guided_and_unguided_requests_share_steps_over_http(tmp_path):
    store = REPO / "models_store"
    bodies = [{"n": 2, "seed": 11, "labels": [2, 7], "guidance": 0.0},
              {"n": 2, "seed": 12, "labels": [4, 9], "guidance": 1.0}]
    with server_process(store, tmp_path / "server.log", providers="cpu") as (base, _), \
            httpx.Client(base_url=base, timeout=120) as http:
        version = http.get("/v1/models/pixelcnn").json()["default_version"]
        alone = [http.post(SAMPLE, json=b).json()["images"] for b in bodies]
        steps_before = scrape(http.get("/metrics").text, "genserve_batch_size_count", graph="sampler")
        with ThreadPoolExecutor(2) as pool:  # sent together: the second joins the first's steps
            together = list(pool.map(lambda b: http.post(SAMPLE, json=b).json()["images"], bodies))
        steps = scrape(http.get("/metrics").text, "genserve_batch_size_count", graph="sampler") - steps_before
    assert together == alone  # the same images, batched or not
    # two requests of 784 steps each took fewer than 2 x 784 steps: guided and unguided shared graph calls
    assert 784 <= steps < 2 * 784 - 100, steps
    ref = reference(store / "pixelcnn" / str(version), [2, 7], 11, 0.0)
    np.testing.assert_array_equal(np.stack([pixels(b) for b in alone[0]]), ref)  # guidance 0: today's sampling
