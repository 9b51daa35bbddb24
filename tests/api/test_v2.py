"""The Open Inference Protocol (/v2) in-process on the tiny store: metadata, JSON and binary inference checked
against ONNX Runtime on the same graphs, the shared batcher's metrics, and errors as {"error": "..."}."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

import service
from tests.api.conftest import make_client, wait_ready
from tests.api.test_server_process import scrape

V2_MODELS = ["gan.generator", "pixelcnn.hrow", "pixelcnn.hstep", "pixelcnn.logprob", "pixelcnn.vstack",
                "pixelcnn.vstep", "vae.decoder", "vae.encoder"]


def ort_outputs(store, path: str, feeds: dict) -> dict:
    """The graph at store/path run directly by ONNX Runtime: the reference every /v2 answer is checked against."""
    sess = ort.InferenceSession(str(store / path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def _tensor(name: str, arr: np.ndarray, datatype: str) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(arr.shape), "data": arr.ravel().tolist()}


def _binary(inputs: dict[str, tuple[np.ndarray, str]], **doc) -> tuple[bytes, dict]:
    """A binary-tensor request body and its header."""
    doc["inputs"] = [{"name": n, "datatype": dt, "shape": list(a.shape), "parameters": {"binary_data_size": a.nbytes}}
                     for n, (a, dt) in inputs.items()]
    head = json.dumps(doc).encode()
    return head + b"".join(a.tobytes() for a, _ in inputs.values()), {"Inference-Header-Content-Length": str(len(head))}


def _error(r, status: int, *fragments: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body      # the V2 error format
    for f in fragments:
        assert f in body["error"], body
    return body["error"]


def test_server_health_metadata_and_index(client):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get("/v2").json()
    assert meta["name"] == "genserve" and "binary_tensor_data" in meta["extensions"]
    assert meta["version"] == service.__version__
    index = client.post("/v2/repository/index").json()
    assert sorted(m["name"] for m in index) == V2_MODELS
    assert {(m["version"], m["state"]) for m in index} == {("1", "READY")}


def test_model_metadata_and_ready(client):
    for name in V2_MODELS:
        assert client.get(f"/v2/models/{name}/ready").status_code == 200
        assert client.get(f"/v2/models/{name}/versions/1/ready").status_code == 200
    meta = client.get("/v2/models/gan.generator").json()
    assert meta == client.get("/v2/models/gan.generator/versions/1").json()
    assert meta["name"] == "gan.generator" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    z_dim = meta["inputs"][0]["shape"][1]
    assert meta["inputs"] == [{"name": "z", "datatype": "FP32", "shape": [-1, z_dim]},
                              {"name": "label", "datatype": "INT64", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    hrow = client.get("/v2/models/pixelcnn.hrow").json()
    assert hrow["inputs"][0]["shape"] == [-1, 1, -1, 28]                         # dynamic height


def test_json_inference_matches_onnxruntime(client, tiny_store, digit_images):
    images = digit_images[:, None].astype(np.float32)
    r = client.post("/v2/models/vae.encoder/infer", json={"id": "req-7", "inputs": [_tensor("image", images, "FP32")]})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("vae.encoder", "1", "req-7")
    ref = ort_outputs(tiny_store, "vae/1/encoder.onnx", {"image": images})
    assert [o["name"] for o in body["outputs"]] == ["mean", "logvar"]
    for out in body["outputs"]:
        assert out["datatype"] == "FP32" and out["shape"] == list(ref[out["name"]].shape)
        np.testing.assert_allclose(np.asarray(out["data"]).reshape(out["shape"]), ref[out["name"]], atol=1e-5)


def test_binary_inference_matches_onnxruntime(client, tiny_store):
    rng = np.random.default_rng(0)
    z, label = rng.standard_normal((3, _z_dim(client))).astype(np.float32), np.array([0, 5, 9], np.int64)
    body, headers = _binary({"z": (z, "FP32"), "label": (label, "INT64")}, id="b1",
                            parameters={"binary_data_output": True})
    r = client.post("/v2/models/gan.generator/versions/1/infer", content=body, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])
    assert head["id"] == "b1" and head["outputs"][0]["parameters"]["binary_data_size"] == 3 * 784 * 4
    image = np.frombuffer(r.content[n:], np.float32).reshape(head["outputs"][0]["shape"])
    ref = ort_outputs(tiny_store, "gan/1/generator.onnx", {"z": z, "label": label})["image"]
    np.testing.assert_allclose(image, ref, atol=1e-5)


def test_large_bodies_and_outputs_are_decoded_and_encoded_off_the_event_loop(client, tiny_store):
    """Above 1 MiB the route decodes the request and encodes the response in a worker thread: both paths must
    give the same answer as the small ones (a JSON body of 256 images; 256 decoded images as binary outputs)."""
    images = np.random.default_rng(2).integers(0, 256, (256, 1, 28, 28)).astype(np.float32)
    body = json.dumps({"inputs": [_tensor("image", images, "FP32")]}).encode()
    assert len(body) > 1 << 20
    r = client.post("/v2/models/vae.encoder/infer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    ref = ort_outputs(tiny_store, "vae/1/encoder.onnx", {"image": images})
    for out in r.json()["outputs"]:
        np.testing.assert_allclose(np.asarray(out["data"]).reshape(out["shape"]), ref[out["name"]], atol=1e-4)

    latent = client.get("/v2/models/vae.decoder").json()["inputs"][0]["shape"][1]
    z = np.random.default_rng(1).standard_normal((256, latent)).astype(np.float32)
    body = json.dumps({"inputs": [_tensor("z", z, "FP32")], "parameters": {"binary_data_output": True}}).encode()
    r = client.post("/v2/models/vae.decoder/infer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])
    assert sum(o["parameters"]["binary_data_size"] for o in head["outputs"]) > 1 << 20
    ref = ort_outputs(tiny_store, "vae/1/decoder.onnx", {"z": z})
    offset = n
    for out in head["outputs"]:
        size = out["parameters"]["binary_data_size"]
        got = np.frombuffer(r.content[offset:offset + size], np.float32).reshape(out["shape"])
        np.testing.assert_allclose(got, ref[out["name"]], atol=1e-5)
        offset += size
    assert offset == len(r.content)


def test_pixelcnn_graphs_chain_on_a_partial_image(client, tiny_store, digit_images):
    """vstack then hrow on the top 5 rows: the graphs the sampler uses, reachable only through /v2."""
    rows = digit_images[:2, None, :5].astype(np.float32)
    label = np.array([3, 10], np.int64)
    r = client.post("/v2/models/pixelcnn.vstack/infer", json={
        "inputs": [_tensor("image", rows, "FP32"), _tensor("label", label, "INT64")],
        "outputs": [{"name": "vfeats", "parameters": {"binary_data": True}}]})
    n = int(r.headers["inference-header-content-length"])
    shape = json.loads(r.content[:n])["outputs"][0]["shape"]
    vfeats = np.frombuffer(r.content[n:], np.float32).reshape(shape)
    body, headers = _binary({"image": (rows, "FP32"), "vfeats": (vfeats, "FP32")})
    r = client.post("/v2/models/pixelcnn.hrow/infer", content=body, headers=headers)
    out = r.json()["outputs"][0]                                  # no binary asked for: JSON
    ref_v = ort_outputs(tiny_store, "pixelcnn/1/vstack.onnx", {"image": rows, "label": label})["vfeats"]
    ref = ort_outputs(tiny_store, "pixelcnn/1/hrow.onnx", {"image": rows, "vfeats": ref_v})["logits"]
    assert out["shape"] == [2, 256, 5, 28]
    np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]), ref, atol=1e-5)


def test_the_step_graphs_over_v2_and_their_windows(client, tiny_store, digit_images):
    """vstep on rows 0..4 at once from nothing, then hstep on all 28 columns of row 4: what the full pass
    (vstack, hrow) gives there. Windows that do not fit together or run past the image are 400s naming them."""
    image = digit_images[:1, None].astype(np.float32)
    meta = client.get("/v2/models/pixelcnn.vstep").json()["inputs"]
    cache = next(t["shape"] for t in meta if t["name"] == "vcache")            # [-1, depth, C, p, 28]
    p = cache[3]
    window = np.concatenate([np.zeros((1, 1, p + 1, 28), np.float32), image[:, :, :4]], axis=2)  # rows -p-1 .. 3
    zero, label = np.zeros(1, np.int64), np.array([10], np.int64)
    inputs = {"image": (window, "FP32"), "vcache": (np.zeros([1, *cache[1:]], np.float32), "FP32"),
              "label": (label, "INT64"), "row": (zero, "INT64")}
    body, headers = _binary(inputs)
    out = client.post("/v2/models/pixelcnn.vstep/infer", content=body, headers=headers).json()["outputs"]
    vfeats = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in out}["vfeats"]
    ref_v = ort_outputs(tiny_store, "pixelcnn/1/vstack.onnx", {"image": image, "label": label})["vfeats"]
    np.testing.assert_allclose(vfeats, ref_v[:, :, :, :5], atol=1e-4)               # n = 5 new rows
    pixels = np.concatenate([np.zeros((1, 1, 1, p + 1), np.float32), image[:, :, 4:5, :27]], axis=3)
    hcache = np.zeros([1, cache[1], cache[2], 1, p], np.float32)
    feeds = {"image": (pixels, "FP32"), "hcache": (hcache, "FP32"), "vfeats": (ref_v[:, :, :, 4:5], "FP32"),
             "col": (zero, "INT64")}
    body, headers = _binary(feeds, outputs=[{"name": "logits"}])
    logits = client.post("/v2/models/pixelcnn.hstep/infer", content=body, headers=headers).json()["outputs"][0]
    ref = ort_outputs(tiny_store, "pixelcnn/1/hrow.onnx", {"image": image[:, :, 4:5],
                                                           "vfeats": ref_v[:, :, :, 4:5]})["logits"]
    np.testing.assert_allclose(np.asarray(logits["data"], np.float32).reshape(logits["shape"]), ref, atol=1e-4)

    body, headers = _binary({**feeds, "col": (np.array([1], np.int64), "INT64")})        # columns 1 .. 28
    _error(client.post("/v2/models/pixelcnn.hstep/infer", content=body, headers=headers), 400, "input 'col'",
           "end at 28", "past the image's 28 columns")
    body, headers = _binary({**feeds, "image": (pixels[..., :-1], "FP32")})               # one column short
    _error(client.post("/v2/models/pixelcnn.hstep/infer", content=body, headers=headers), 400, "input 'image'",
           "so this one must be")
    body, headers = _binary({**inputs, "row": (np.array([24], np.int64), "INT64")})      # rows 24 .. 28
    _error(client.post("/v2/models/pixelcnn.vstep/infer", content=body, headers=headers), 400, "input 'row'",
           "past the image's 28 rows")


def _z_dim(client) -> int:
    return client.get("/v2/models/gan.generator").json()["inputs"][0]["shape"][1]


def test_v2_goes_through_the_v1_batcher_and_metrics(client):
    series = {"name": "genserve_batch_size_sum", "graph": "generator", "model": "gan", "version": "1"}
    before = scrape(client.get("/metrics").text, **series)
    assert client.post("/v1/gan/sample", json={"n": 2}).status_code == 200
    z, label = np.zeros((5, _z_dim(client)), np.float32), np.ones(5, np.int64)
    body, headers = _binary({"z": (z, "FP32"), "label": (label, "INT64")})
    assert client.post("/v2/models/gan.generator/infer", content=body, headers=headers).status_code == 200
    text = client.get("/metrics").text
    assert scrape(text, **series) - before == 7                     # one batcher counts both
    assert 'route="/v2/models/{name}/infer"' in text


def test_unknown_models_and_versions_are_404(client):
    _error(client.get("/v2/models/gan.nothing"), 404, "gan.nothing", "gan.generator")
    _error(client.get("/v2/models/gan"), 404)
    _error(client.get("/v2/models/gan.generator/versions/2"), 404, "version '2'")
    _error(client.get("/v2/models/gan.generator/versions/latest/ready"), 404)
    _error(client.post("/v2/models/nope.graph/infer", json={"inputs": []}), 404)
    _error(client.get("/v2/nowhere"), 404)
    _error(client.get("/v2/models/gan.generator/infer"), 405)


def _gan_inputs(z_dim: int, **override) -> list[dict]:
    z = {"name": "z", "datatype": "FP32", "shape": [1, z_dim], "data": [0.0] * z_dim}
    label = {"name": "label", "datatype": "INT64", "shape": [1], "data": [1]}
    return [{**z, **override.get("z", {})}, {**label, **override.get("label", {})}]


@pytest.mark.parametrize("override,fragments", [
    ({"z": {"name": "noise"}}, ("unknown input 'noise'",)),
    ({"label": {"datatype": "FP32"}}, ("input 'label'", "FP32", "INT64")),
    ({"z": {"shape": [1, 100], "data": [0.0] * 100}}, ("input 'z'", "[1, 100]")),
    ({"z": {"data": [0.0] * 5}}, ("input 'z'", "data has 5")),
    ({"label": {"data": [99]}}, ("input 'label'", "0..9", "99")),
    ({"label": {"data": [-1]}}, ("input 'label'", "0..9")),     # a valid Gather index in ONNX: a wrong answer
])
def test_bad_inputs_are_400_naming_them(client, override, fragments):
    body = {"inputs": _gan_inputs(_z_dim(client), **override)}
    _error(client.post("/v2/models/gan.generator/infer", json=body), 400, *fragments)


def test_values_and_sizes_out_of_range_are_400_before_queueing(client, tiny_store):
    image = np.full((1, 1, 28, 28), 300.0, np.float32)
    label = np.array([0], np.int64)
    body = {"inputs": [_tensor("image", image, "FP32"), _tensor("label", label, "INT64")]}
    _error(client.post("/v2/models/pixelcnn.logprob/infer", json=body), 400, "input 'image'", "0..255")
    tall = np.zeros((1, 1, 29, 28), np.float32)
    body = {"inputs": [_tensor("image", tall, "FP32"), _tensor("label", label, "INT64")]}
    _error(client.post("/v2/models/pixelcnn.vstack/infer", json=body), 400, "input 'image'", "29", "28 allowed")
    latent = client.get("/v2/models/vae.decoder").json()["inputs"][0]["shape"][1]
    data, headers = _binary({"z": (np.full((1, latent), np.nan, np.float32), "FP32")})   # JSON cannot carry NaN
    _error(client.post("/v2/models/vae.decoder/infer", content=data, headers=headers), 400, "input 'z'", "finite")
    with make_client(tiny_store, v2_max_batch=2) as c:
        wait_ready(c)
        body = {"inputs": [_tensor("z", np.zeros((3, latent), np.float32), "FP32")]}
        _error(c.post("/v2/models/vae.decoder/infer", json=body), 400, "input 'z'", "above the 2 allowed")


def test_pixels_must_be_whole_and_big_outputs_cap_the_batch(client, tiny_store):
    label = np.array([10], np.int64)
    half = {"inputs": [_tensor("image", np.full((1, 1, 28, 28), 0.5, np.float32), "FP32"),
                       _tensor("label", label, "INT64")]}
    _error(client.post("/v2/models/pixelcnn.logprob/infer", json=half), 400, "input 'image'", "whole numbers", "0.5")
    # the VAE encoder is continuous in its pixels: a decoder's output fed back as is must pass
    soft = {"inputs": [_tensor("image", np.full((1, 1, 28, 28), 127.5, np.float32), "FP32")]}
    assert client.post("/v2/models/vae.encoder/infer", json=soft).status_code == 200
    # vstack answers (channels..., height, 28) floats an image, height counted at its max of 28 (~1.4 MB for the
    # shipped model): a cap just over one image's worth admits one image and refuses two
    dims = client.get("/v2/models/pixelcnn.vstack").json()["outputs"][0]["shape"][1:]
    per_image = int(np.prod([28 if d == -1 else d for d in dims])) * 4
    with make_client(tiny_store, v2_max_output_bytes=per_image + 1) as c:
        wait_ready(c)
        def body(n):
            return {"inputs": [_tensor("image", np.zeros((n, 1, 8, 28), np.float32), "FP32"),
                               _tensor("label", np.full(n, 10, np.int64), "INT64")]}
        assert c.post("/v2/models/pixelcnn.vstack/infer", json=body(1)).status_code == 200
        _error(c.post("/v2/models/pixelcnn.vstack/infer", json=body(2)), 400, "input 'image'", "above the 1 allowed",
               "GENSERVE_V2_MAX_OUTPUT_BYTES")
        z = np.zeros((3, _z_dim(c)), np.float32)  # a small output: three images pass the same cap
        gan = {"inputs": [_tensor("z", z, "FP32"), _tensor("label", np.array([1, 2, 3], np.int64), "INT64")]}
        assert c.post("/v2/models/gan.generator/infer", json=gan).status_code == 200


def test_odd_numbers_and_encodings_are_4xx_not_500(client):
    _error(client.get("/v2/models/gan.generator/versions/\u00b2"), 404)             # '²'.isdigit() is True
    _error(client.get("/v2/models/gan.generator/versions/" + "9" * 5000), 404)     # int() refuses > 4300 digits
    body = {"inputs": _gan_inputs(_z_dim(client))}
    for length in ("\u00b2", "9" * 5000, "-1"):
        r = client.post("/v2/models/gan.generator/infer", content=json.dumps(body).encode(),
                        headers={"Inference-Header-Content-Length": length.encode()})
        _error(r, 400, "Inference-Header-Content-Length")
    r = client.post("/v2/models/gan.generator/infer", content=json.dumps(body).encode(),
                    headers={"content-encoding": "gzip", "content-type": "application/json"})
    _error(r, 400, "Content-Encoding")


def test_malformed_bodies_are_400(client):
    r = client.post("/v2/models/vae.decoder/infer", content=b"{nope", headers={"content-type": "application/json"})
    _error(r, 400, "not valid JSON")
    latent = client.get("/v2/models/vae.decoder").json()["inputs"][0]["shape"][1]
    body, headers = _binary({"z": (np.zeros((1, latent), np.float32), "FP32")})
    _error(client.post("/v2/models/vae.decoder/infer", content=body), 400, "Inference-Header-Content-Length")
    _error(client.post("/v2/models/vae.decoder/infer", content=body[:-4], headers=headers), 400, "input 'z'")


def test_not_ready_is_503(client):
    reg = client.app.state.registry
    reg.ready = False
    try:
        _error(client.get("/v2/health/ready"), 503, "loading")
        _error(client.get("/v2/models/vae.decoder/ready"), 503)
        _error(client.post("/v2/models/vae.decoder/infer", json={"inputs": []}), 503)
        assert client.get("/v2/health/live").status_code == 200
    finally:
        reg.ready = True


def test_body_over_limit_is_413_in_v2_format(tiny_store):
    with make_client(tiny_store, max_body_bytes=4096) as c:
        wait_ready(c)
        image = np.zeros((2, 1, 28, 28), np.float32)
        _error(c.post("/v2/models/vae.encoder/infer", json={"inputs": [_tensor("image", image, "FP32")]}), 413,
               "4096")
