"""NVIDIA's tritonclient.http against a real `python -m service` on the shipped models_store (loopback port):
health, metadata, binary and JSON inference checked against ONNX Runtime on the same files, errors, and V2
requests batched together with /v1 ones."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.api.conftest import server_process
from tests.api.test_server_process import scrape
from tests.api.test_v2 import ort_outputs
from tests.conftest import REPO

pytestmark = pytest.mark.slow
STORE = REPO / "models_store"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("v2-server") / "server.log"
    with server_process(STORE, log, warmup="false", max_delay_ms="20") as (base, _):
        yield base


@pytest.fixture(scope="module")
def triton(server):
    client = httpclient.InferenceServerClient(url=server.removeprefix("http://"), concurrency=16)
    yield client
    client.close()


def _input(name: str, arr: np.ndarray, datatype: str, binary: bool) -> httpclient.InferInput:
    t = httpclient.InferInput(name, list(arr.shape), datatype)
    t.set_data_from_numpy(arr, binary_data=binary)
    return t


def test_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "genserve" and "binary_tensor_data" in meta["extensions"]
    for name in ("gan.generator", "vae.encoder", "vae.decoder", "pixelcnn.logprob", "pixelcnn.vstack",
                 "pixelcnn.hrow"):
        assert triton.is_model_ready(name) and triton.is_model_ready(name, "1")
    assert not triton.is_model_ready("gan.nothing")
    model = triton.get_model_metadata("gan.generator", "1")
    assert model["platform"] == "onnxruntime_onnx" and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "z", "datatype": "FP32", "shape": [-1, 64]},
                               {"name": "label", "datatype": "INT64", "shape": [-1]}]
    index = triton.get_model_repository_index()
    assert {m["name"] for m in index} >= {"gan.generator", "pixelcnn.hrow"}


def test_binary_inference_matches_onnxruntime(triton):
    rng = np.random.default_rng(3)
    z, label = rng.standard_normal((4, 64)).astype(np.float32), np.array([0, 3, 7, 9], np.int64)
    result = triton.infer("gan.generator", [_input("z", z, "FP32", True), _input("label", label, "INT64", True)],
                          outputs=[httpclient.InferRequestedOutput("image", binary_data=True)], request_id="bin-1")
    assert result.get_response()["id"] == "bin-1"
    assert result.get_output("image")["parameters"]["binary_data_size"] == 4 * 784 * 4
    ref = ort_outputs(STORE, "gan/1/generator.onnx", {"z": z, "label": label})["image"]
    np.testing.assert_allclose(result.as_numpy("image"), ref, atol=1e-5)


def test_json_inference_matches_onnxruntime(triton, digits):
    images = digits[2].images[:3, None].astype(np.float32)
    result = triton.infer("vae.encoder", [_input("image", images, "FP32", False)], model_version="1",
                          outputs=[httpclient.InferRequestedOutput(n, binary_data=False) for n in ("mean", "logvar")])
    assert "data" in result.get_output("mean")                   # JSON, not binary
    ref = ort_outputs(STORE, "vae/1/encoder.onnx", {"image": images})
    for name in ("mean", "logvar"):
        np.testing.assert_allclose(result.as_numpy(name), ref[name], atol=1e-5)
    labels = np.array([10, 4, 4], np.int64)                       # default outputs: binary, as tritonclient asks
    result = triton.infer("pixelcnn.logprob", [_input("image", images, "FP32", False),
                                               _input("label", labels, "INT64", False)], model_version="1")
    ref = ort_outputs(STORE, "pixelcnn/1/logprob.onnx", {"image": images, "label": labels})["log_probs"]
    np.testing.assert_allclose(result.as_numpy("log_probs"), ref, atol=1e-5)


def test_errors_raise_inference_server_exception(triton):
    z = np.zeros((1, 64), np.float32)
    with pytest.raises(InferenceServerException) as info:
        triton.infer("gan.generator", [_input("noise", z, "FP32", True),
                                       _input("label", np.ones(1, np.int64), "INT64", True)])
    assert info.value.status() == "400" and "unknown input 'noise'" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.infer("gan.generator", [_input("z", z.astype(np.float64), "FP64", False),
                                       _input("label", np.ones(1, np.int64), "INT64", False)])
    assert info.value.status() == "400" and "input 'z'" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("gan.nothing")
    assert info.value.status() == "404" and "gan.nothing" in info.value.message()


def test_v2_and_v1_requests_share_the_batcher(triton, server):
    before = httpx.get(server + "/metrics").text
    z, label = np.zeros((1, 64), np.float32), np.ones(1, np.int64)
    n_v2, n_v1 = 16, 8
    with cf.ThreadPoolExecutor(n_v1) as pool:
        v1 = [pool.submit(httpx.post, server + "/v1/gan/sample", json={"n": 1}, timeout=30) for _ in range(n_v1)]
        pending = [triton.async_infer("gan.generator", [_input("z", z, "FP32", True),
                                                        _input("label", label, "INT64", True)])
                   for _ in range(n_v2)]
        results = [p.get_result(timeout=30) for p in pending]
        assert all(f.result().status_code == 200 for f in v1)
    ref = results[0].as_numpy("image")
    assert all(np.allclose(r.as_numpy("image"), ref, atol=1e-5) for r in results)
    after = httpx.get(server + "/metrics").text
    labels = {"model": "gan", "graph": "generator"}
    items = scrape(after, "genserve_batch_size_sum", **labels) - scrape(before, "genserve_batch_size_sum", **labels)
    batches = (scrape(after, "genserve_batch_size_count", **labels)
               - scrape(before, "genserve_batch_size_count", **labels))
    assert items == n_v2 + n_v1
    assert batches < n_v2 + n_v1, f"{n_v2 + n_v1} concurrent requests ran as {batches} batches: nothing was merged"
    deadline = time.monotonic() + 10     # a request is counted just after its response is sent (bounded wait)
    while scrape(after, "genserve_http_requests_total", route="/v2/models/{name}/infer", status="200") < n_v2:
        assert time.monotonic() < deadline, "the /v2 requests were not all counted"
        time.sleep(0.1)
        after = httpx.get(server + "/metrics").text
