"""The Open Inference Protocol codec on its own: JSON and binary tensors in, JSON and binary tensors out."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.http import InferResult

from service.v2_codec import TensorError, TensorMeta, decode_request, encode_response, v2_datatype

INPUTS = [TensorMeta("z", "FP32", ("batch", 4)), TensorMeta("label", "INT64", ("batch",))]
OUTPUTS = ["image", "score"]


def _json(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def _inputs(z=None, label=None) -> list[dict]:
    z = {"name": "z", "datatype": "FP32", "shape": [2, 4], "data": list(range(8))} if z is None else z
    label = {"name": "label", "datatype": "INT64", "shape": [2], "data": [3, 7]} if label is None else label
    return [z, label]


def _binary_body(doc: dict, *arrays: np.ndarray) -> tuple[bytes, str]:
    head = _json(doc)
    return head + b"".join(a.astype(a.dtype.newbyteorder("<")).tobytes() for a in arrays), str(len(head))


def test_datatype_names():
    assert [v2_datatype(t) for t in ("float32", "int64", "uint8", np.float16, np.bool_)] == \
        ["FP32", "INT64", "UINT8", "FP16", "BOOL"]
    assert v2_datatype(np.dtype(">f8")) == "FP64"
    with pytest.raises(TensorError):
        v2_datatype("U8")
    meta = TensorMeta("image", "FP32", ("batch", 1, "height", 28))
    assert meta.metadata() == {"name": "image", "datatype": "FP32", "shape": [-1, 1, -1, 28]}


def test_json_request_flat_and_nested():
    req = decode_request(_json({"id": "r1", "inputs": _inputs()}), None, INPUTS, OUTPUTS)
    assert req.id == "r1" and req.outputs == [("image", False), ("score", False)]
    assert req.inputs["z"].dtype == np.float32 and req.inputs["z"].shape == (2, 4)
    np.testing.assert_array_equal(req.inputs["z"], np.arange(8, dtype=np.float32).reshape(2, 4))
    assert req.inputs["label"].dtype == np.int64 and req.inputs["label"].tolist() == [3, 7]
    nested = _inputs(z={"name": "z", "datatype": "FP32", "shape": [2, 4], "data": [[0, 1, 2, 3], [4, 5, 6, 7]]})
    same = decode_request(_json({"inputs": nested}), None, INPUTS, OUTPUTS)
    np.testing.assert_array_equal(same.inputs["z"], req.inputs["z"])
    assert same.id is None


def test_binary_request_and_output_selection():
    z = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    label = np.array([1, 2, 3], np.int64)
    doc = {"inputs": [{"name": "label", "datatype": "INT64", "shape": [3], "parameters": {"binary_data_size": 24}},
                      {"name": "z", "datatype": "FP32", "shape": [3, 4], "parameters": {"binary_data_size": 48}}],
           "parameters": {"binary_data_output": True},
           "outputs": [{"name": "score"}, {"name": "image", "parameters": {"binary_data": False}}]}
    body, length = _binary_body(doc, label, z)                 # blobs follow the JSON in the inputs' order
    req = decode_request(body, length, INPUTS, OUTPUTS)
    np.testing.assert_array_equal(req.inputs["z"], z)
    np.testing.assert_array_equal(req.inputs["label"], label)
    assert req.outputs == [("score", True), ("image", False)]


def test_mixed_json_and_binary_inputs():
    z = np.ones((2, 4), np.float32)
    doc = {"inputs": _inputs(z={"name": "z", "datatype": "FP32", "shape": [2, 4],
                                "parameters": {"binary_data_size": 32}})}
    req = decode_request(*_binary_body(doc, z), INPUTS, OUTPUTS)
    np.testing.assert_array_equal(req.inputs["z"], z)


@pytest.mark.parametrize("doc,fragment", [
    ({"inputs": _inputs() + [{"name": "w", "datatype": "FP32", "shape": [1], "data": [1]}]}, "unknown input 'w'"),
    ({"inputs": _inputs()[:1]}, "missing input 'label'"),
    ({"inputs": _inputs() + _inputs()[1:]}, "input 'label' is given twice"),
    ({"inputs": _inputs(label={"name": "label", "datatype": "INT32", "shape": [2], "data": [1, 2]})},
     "input 'label': datatype 'INT32' does not match the model's INT64"),
    ({"inputs": _inputs(z={"name": "z", "datatype": "FP32", "shape": [2, 5], "data": list(range(10))})},
     "input 'z': shape [2, 5] does not match the model's [-1, 4]"),
    ({"inputs": _inputs(z={"name": "z", "datatype": "FP32", "shape": [8], "data": list(range(8))})},
     "input 'z': shape [8] does not match"),
    ({"inputs": _inputs(z={"name": "z", "datatype": "FP32", "shape": [2, 4], "data": list(range(7))})},
     "input 'z': shape [2, 4] needs 8 elements, data has 7"),
    ({"inputs": _inputs(z={"name": "z", "datatype": "FP32", "shape": [0, 4], "data": []})}, "below 1"),
    ({"inputs": _inputs(z={"name": "z", "datatype": "FP32", "shape": [2, 4], "data": ["a"] * 8})},
     "input 'z': data holds string values"),
    ({"inputs": _inputs(z={"name": "z", "datatype": "FP32", "shape": [2, 4], "data": [[1, 2], [3]]})},
     "input 'z': data is not a regular"),
    ({"inputs": _inputs(label={"name": "label", "datatype": "INT64", "shape": [2], "data": [1.5, 2]})},
     "input 'label': data holds floating-point values"),
    ({"inputs": _inputs(label={"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 2 ** 70]})},
     "input 'label': values outside the INT64 range"),
    ({"inputs": _inputs(label={"name": "label", "datatype": "INT64", "shape": [2], "data": [2 ** 63, -1]})},
     "input 'label': values outside the INT64 range"),
    ({"inputs": _inputs(label={"name": "label", "datatype": "INT64", "shape": [2], "data": [-2 ** 63 - 1, 0]})},
     "input 'label': values outside the INT64 range"),  # parsed as the float -2**63
    ({"inputs": _inputs(label={"name": "label", "datatype": "INT64", "shape": [2], "data": [[1], [1.5]]})},
     "input 'label': data holds floating-point values (e.g. 1.5)"),
    ({"inputs": _inputs(label={"name": "label", "datatype": "INT64", "shape": [3], "data": [1, 2, 3]})},
     "input 'label': dimension 0 ('batch') is 3, but input 'z' has 2"),
    ({"inputs": _inputs(label={"name": "label", "datatype": "INT64", "shape": [2]})}, "input 'label': neither"),
    ({"inputs": _inputs(label={"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 2],
                               "parameters": {"binary_data_size": 16}})}, "both data and binary_data_size"),
    ({"inputs": _inputs(label={"name": "label", "datatype": "INT64", "shape": [2],
                               "parameters": {"binary_data_size": 16}})}, "input 'label': its 16 binary bytes"),
    ({"inputs": _inputs(label={"name": "label", "datatype": "INT64", "shape": [2],
                               "parameters": {"binary_data_size": 12}})}, "binary_data_size 12 is not the 16"),
    ({"inputs": _inputs(label={"name": "label", "datatype": "INT64", "shape": [2],
                               "parameters": {"shared_memory_region": "r"}})}, "shared memory is not supported"),
    ({"inputs": _inputs(), "outputs": [{"name": "nope"}]}, "unknown output 'nope'"),
    ({"inputs": _inputs(), "outputs": [{"name": "image"}, {"name": "image"}]}, "output 'image' is requested twice"),
    ({"inputs": _inputs(), "outputs": [{"name": "image", "parameters": {"binary_data": "yes"}}]}, "binary_data"),
    ({"inputs": _inputs(), "outputs": [{"name": "image", "parameters": {"classification": 3}}]}, "classification"),
    ({"inputs": []}, "inputs must be a non-empty list"),
    ({"id": 5, "inputs": _inputs()}, "id must be a string"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_requests_name_the_problem(doc, fragment):
    with pytest.raises(TensorError) as info:
        decode_request(_json(doc), None, INPUTS, OUTPUTS)
    assert fragment in str(info.value), str(info.value)


def test_body_framing_errors():
    with pytest.raises(TensorError, match="not valid JSON.*Inference-Header-Content-Length"):
        decode_request(_json({"inputs": _inputs(z={"name": "z", "datatype": "FP32", "shape": [2, 4], "parameters": {
            "binary_data_size": 32}})}) + b"\x00" * 32, None, INPUTS, OUTPUTS)
    doc = {"inputs": _inputs()}
    for bad in ("-1", "abc", "100000"):
        with pytest.raises(TensorError, match="Inference-Header-Content-Length"):
            decode_request(_json(doc), bad, INPUTS, OUTPUTS)
    body, length = _binary_body(doc, np.zeros(3, np.int8))     # 3 stray bytes no input claims
    with pytest.raises(TensorError, match="3 bytes follow the JSON"):
        decode_request(body, length, INPUTS, OUTPUTS)


def test_json_response_parses_with_tritonclient():
    image = np.random.default_rng(1).standard_normal((2, 1, 3, 3)).astype(np.float32)
    score = np.array([1, -2], np.int64)
    body, length = encode_response("gan.generator", "1", "abc", {"image": image, "score": score},
                                   [("image", False), ("score", False)])
    assert length is None
    doc = json.loads(body)
    assert doc["model_name"] == "gan.generator" and doc["model_version"] == "1" and doc["id"] == "abc"
    assert doc["outputs"][0]["datatype"] == "FP32" and doc["outputs"][0]["shape"] == [2, 1, 3, 3]
    assert len(doc["outputs"][0]["data"]) == 18                # flat, row-major
    result = InferResult.from_response_body(body)
    np.testing.assert_array_equal(result.as_numpy("image"), image)   # float32 survives JSON exactly
    np.testing.assert_array_equal(result.as_numpy("score"), score)


def test_binary_response_parses_with_tritonclient():
    image = np.random.default_rng(2).standard_normal((2, 5)).astype(np.float32)
    flags = np.array([True, False])
    body, length = encode_response("m.g", "3", None, {"image": image, "flags": flags},
                                   [("flags", True), ("image", True)])
    head = json.loads(body[:length])
    assert "id" not in head
    assert [o["parameters"]["binary_data_size"] for o in head["outputs"]] == [2, 40]
    assert len(body) == length + 42
    result = InferResult.from_response_body(body, header_length=length)
    np.testing.assert_array_equal(result.as_numpy("image"), image)
    np.testing.assert_array_equal(result.as_numpy("flags"), flags)


def test_int64_extremes_pass():
    lab = {"name": "label", "datatype": "INT64", "shape": [2], "data": [-2 ** 63, 2 ** 63 - 1]}
    req = decode_request(_json({"inputs": _inputs(label=lab)}), None, INPUTS, OUTPUTS)
    assert req.inputs["label"].tolist() == [-2 ** 63, 2 ** 63 - 1]


def test_an_axis_derived_from_another_must_agree_with_it():
    """The PixelCNN hstep graph: `image` spans the new columns and 2 cached ones ('new + 2'), `vfeats` the new
    columns ('new'); sizes that do not fit together are a 400 naming both, not an ONNX Runtime failure."""
    inputs = [TensorMeta("image", "FP32", ("batch", 1, 1, "new + 2")),
              TensorMeta("vfeats", "FP32", ("batch", 3, "new"))]

    def request(width: int, new: int) -> bytes:
        return _json({"inputs": [
            {"name": "image", "datatype": "FP32", "shape": [1, 1, 1, width], "data": [0.0] * width},
            {"name": "vfeats", "datatype": "FP32", "shape": [1, 3, new], "data": [0.0] * (3 * new)}]})

    req = decode_request(request(5, 3), None, inputs, OUTPUTS)
    assert req.inputs["image"].shape == (1, 1, 1, 5)
    with pytest.raises(TensorError, match=r"input 'vfeats': dimension 2 \('new'\) is 4, but input 'image' has 5 "
                                          r"\('new \+ 2'\), so this one must be 3"):
        decode_request(request(5, 4), None, inputs, OUTPUTS)
    with pytest.raises(TensorError, match=r"dimension 3 \('new \+ 2'\) is 2, must be at least 3"):
        decode_request(request(2, 1), None, inputs, OUTPUTS)
