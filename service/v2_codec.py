"""Open Inference Protocol (KServe V2) tensors over REST: decode requests, encode responses. No HTTP framework here.

Request: a JSON object `{"id"?, "parameters"?, "inputs": [...], "outputs"?: [...]}`. Each input is
`{"name", "datatype", "shape", "data"}` with `data` the elements in row-major order (flat or nested), or, with
the binary tensor data extension, `"parameters": {"binary_data_size": n}` and no `data`: the tensor's n bytes
(little-endian, row-major, no padding) follow the JSON in the body, in the order of the inputs, and the
`Inference-Header-Content-Length` header gives the JSON's length in bytes.

Response: `{"model_name", "model_version", "id"? (echoed), "outputs": [...]}`. An output is sent as binary when
its request output says `"parameters": {"binary_data": true}`, or else when the request's parameters say
`"binary_data_output": true`; its JSON then carries `"parameters": {"binary_data_size": n}` and its bytes follow
the JSON, whose length the caller puts in the `Inference-Header-Content-Length` response header.

Everything wrong with a request raises TensorError with a message that names the input or output; the API
layer (service/errors.py) answers it 400. JSON cannot carry NaN or infinity: ask for binary outputs for those.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import orjson

# V2 datatype names and their numpy types (BYTES, variable-length strings, is not supported)
DATATYPES: dict[str, np.dtype] = {name: np.dtype(t) for name, t in (
    ("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32), ("UINT64", np.uint64),
    ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64),
    ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64))}
_BY_NUMPY = {dt: name for name, dt in DATATYPES.items()}
# what a JSON array may hold for each kind of target type: numpy kinds of np.asarray(data)
_JSON_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}
_KIND_WORDS = {"b": "boolean", "i": "integer", "u": "integer", "f": "floating-point", "U": "string"}


class TensorError(ValueError):
    """The request is malformed or does not fit the model: answered 400 with this message."""


def v2_datatype(dtype) -> str:
    """numpy dtype (or its name, e.g. the manifest's 'float32') -> V2 datatype ('FP32')."""
    try:
        name = _BY_NUMPY.get(np.dtype(dtype).newbyteorder("="))
    except TypeError:
        name = None
    if name is None:
        raise TensorError(f"dtype {dtype} has no V2 datatype")
    return name


@dataclass(frozen=True)
class TensorMeta:
    """A model input as the protocol sees it. dims: an int is a fixed size; a str names a dynamic axis (-1 in
    metadata), and inputs sharing that name must agree on its size (e.g. 'batch')."""
    name: str
    datatype: str
    dims: tuple[int | str, ...]

    @property
    def shape(self) -> list[int]:
        return [d if isinstance(d, int) else -1 for d in self.dims]

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]]       # (output name, as binary), in response order


def _fail(msg: str) -> NoReturn:
    raise TensorError(msg)


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def decimal(s: str, max_digits: int = 12) -> int | None:
    """A plain ASCII decimal of at most max_digits, else None. Not str.isdigit(): it accepts '²', which int()
    refuses, and int() also refuses more than 4300 digits; either would escape as a 500."""
    s = s.strip()
    return int(s) if 0 < len(s) <= max_digits and s.isascii() and s.isdigit() else None


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """(the JSON object, the binary section after it)."""
    if header_length is None:
        head, rest = body, b""
    else:
        n = decimal(header_length)
        if n is None or n > len(body):
            _fail(f"Inference-Header-Content-Length {header_length[:40]!r} is not a length within the "
                  f"{len(body)}-byte body")
        head, rest = body[:n], body[n:]
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        binary = header_length is None and b"binary_data_size" in head
        hint = " (binary tensor data needs the Inference-Header-Content-Length header)" if binary else ""
        _fail(f"request body is not valid JSON: {e}{hint}")
    if not isinstance(doc, dict):
        _fail("request body must be a JSON object")
    return doc, rest


def _params(obj: dict, where: str) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        _fail(f"{where}: parameters must be an object")
    if "shared_memory_region" in params:
        _fail(f"{where}: shared memory is not supported")
    return params


def _past_range(arr: np.ndarray, info: np.iinfo) -> bool:
    """Whether data that numpy could not hold as integers holds integers past info's range: those beyond 64 bits
    come as Python ints in an object array, or as integral floats (a JSON parser's reading of them)."""
    flat = arr.reshape(-1)
    if arr.dtype.kind == "O":  # only ints past uint64 make one; bounded by the body limit
        return any(_is_int(x) and not info.min <= x <= info.max for x in flat.tolist())
    if arr.dtype.kind != "f":
        return False
    whole = np.isfinite(flat) & (flat == np.floor(flat))
    # float(2**63 - 1) is 2**63, and -2**63 - 1 parses as -2**63: at the edges the float itself is out of range
    low = flat <= info.min if info.min < 0 else flat < info.min
    return bool((whole & (low | (flat >= float(info.max)))).any())


_NUMBER_TYPES = frozenset({int, float})


def _check_json_elements(meta: TensorMeta, data: list, target: np.dtype) -> None:
    """Refuse elements numpy would take in silently: null (an object array, then a crash), and true/false
    where numbers are wanted (np.asarray([True, 0.5]) is [1.0, 0.5]), or numbers where booleans are."""
    try:
        elements = np.asarray(data, dtype=object).reshape(-1).tolist()
    except ValueError:  # ragged nesting; the numeric conversion below says so
        return
    found = set(map(type, elements))  # in C: cheap even for the largest body
    if list in found:  # ragged too, a list where a number should be
        return
    wanted = frozenset({bool}) if target.kind == "b" else _NUMBER_TYPES
    if odd := found - wanted:
        example = next(x for x in elements if type(x) in odd)
        word = {type(None): "null", bool: "boolean", dict: "object", str: "string", int: "integer",
                float: "floating-point"}.get(type(example), "non-numeric")
        _fail(f"input '{meta.name}': data holds {word} values (e.g. {_short(example)}), not {meta.datatype}")


def _json_tensor(meta: TensorMeta, data, shape: list[int], count: int) -> np.ndarray:
    target = DATATYPES[meta.datatype]
    if not isinstance(data, list):
        _fail(f"input '{meta.name}': data must be a list")
    _check_json_elements(meta, data, target)
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        _fail(f"input '{meta.name}': data is not a regular (flat or nested) list of numbers")
    if arr.size != count:
        _fail(f"input '{meta.name}': shape {shape} needs {count} elements, data has {arr.size}")
    if arr.dtype.kind not in _JSON_KINDS[target.kind]:
        if target.kind in "iu" and _past_range(arr, info := np.iinfo(target)):
            _fail(f"input '{meta.name}': values outside the {meta.datatype} range {info.min}..{info.max}")
        flat = arr.reshape(-1)
        fractional = np.flatnonzero(flat != np.floor(flat)) if arr.dtype.kind == "f" else ()
        example = flat[fractional[0] if len(fractional) else 0].item()  # 1.5 rather than the 1.0 beside it
        kind = _KIND_WORDS.get(arr.dtype.kind, "non-numeric")
        _fail(f"input '{meta.name}': data holds {kind} values (e.g. {_short(example)}), not {meta.datatype}")
    if target.kind in "iu" and arr.size:
        info = np.iinfo(target)
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            _fail(f"input '{meta.name}': values outside the {meta.datatype} range {info.min}..{info.max}")
    return arr.astype(target).reshape(shape)


def _input(item, specs: dict[str, TensorMeta], rest: bytes, offset: int) -> tuple[str, np.ndarray, int]:
    """One request input -> (name, array, new offset into the binary section)."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        _fail("every input must be an object with a string 'name'")
    name = item["name"]
    meta = specs.get(name)
    if meta is None:
        _fail(f"unknown input '{name}'; the model's inputs are {sorted(specs)}")
    if item.get("datatype") != meta.datatype:
        _fail(f"input '{name}': datatype {_short(item.get('datatype'))} does not match the model's {meta.datatype}")
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        _fail(f"input '{name}': shape must be a list of integers")
    if len(shape) != len(meta.dims) or any(isinstance(m, int) and d != m
                                           for d, m in zip(shape, meta.dims, strict=True)):
        _fail(f"input '{name}': shape {shape} does not match the model's {meta.shape}")
    if any(d < 1 for d in shape):
        _fail(f"input '{name}': shape {shape} has a dimension below 1")
    count, params = math.prod(shape), _params(item, f"input '{name}'")
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in item:
            _fail(f"input '{name}': neither data nor a binary_data_size parameter")
        return name, _json_tensor(meta, item["data"], shape, count), offset
    if "data" in item:
        _fail(f"input '{name}': both data and binary_data_size given")
    dtype = DATATYPES[meta.datatype]
    if not _is_int(size) or size != count * dtype.itemsize:
        _fail(f"input '{name}': binary_data_size {_short(size)} is not the {count * dtype.itemsize} bytes of a "
              f"{meta.datatype} tensor of shape {shape}")
    if offset + size > len(rest):
        _fail(f"input '{name}': its {size} binary bytes are missing (the body has {len(rest) - offset} more after "
              f"the JSON; is the Inference-Header-Content-Length header set?)")
    arr = np.frombuffer(rest, dtype.newbyteorder("<"), count, offset).reshape(shape)
    return name, arr.astype(dtype, copy=False), offset + size


_DERIVED = re.compile(r"(\w+) \+ (\d+)")  # a dynamic axis that is another one plus a constant, as torch.export names it


def _check_dims(specs: dict[str, TensorMeta], arrays: dict[str, np.ndarray]) -> None:
    """Inputs that share a named dynamic axis must agree on its size, and an axis named `new + 2` (the PixelCNN
    step graphs' windows: the new positions and the cached ones) must be 2 more than the axis `new`, at least 1."""
    seen: dict[str, tuple[int, str, str, int]] = {}  # symbol -> its size, and the input, axis name, size giving it
    for name, arr in arrays.items():
        for i, d in enumerate(specs[name].dims):
            if not isinstance(d, str):
                continue
            symbol, offset = d, 0
            if match := _DERIVED.fullmatch(d):
                symbol, offset = match[1], int(match[2])
                if arr.shape[i] - offset < 1:
                    _fail(f"input '{name}': dimension {i} ('{d}') is {arr.shape[i]}, must be at least {offset + 1}")
            size, first, first_d, first_size = seen.setdefault(symbol, (arr.shape[i] - offset, name, d,
                                                                        arr.shape[i]))
            if size != arr.shape[i] - offset:
                must = f", so this one must be {size + offset}" if (offset or first_d != d) else ""
                _fail(f"input '{name}': dimension {i} ('{d}') is {arr.shape[i]}, but input '{first}' has "
                      f"{first_size}" + (f" ('{first_d}')" if first_d != d else "") + must)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a graph, checked before it is queued. max_batch keeps one request from
    filling the queue it shares with /v1 (which caps a request at 256 items); max_axis bounds the other dynamic
    axes (the PixelCNN step graphs' height, exported with max 28), so outputs stay bounded; ranges: input name
    -> (low, high) of its values, because out-of-range indices are not errors in ONNX (a negative label is a
    valid Gather index, a silently wrong answer) and pixel values index the 256-way output."""
    max_batch: int
    max_axis: int
    ranges: dict[str, tuple[float, float]]
    batch_why: str = ""  # said when a batch is refused: what set max_batch, if not the plain cap
    whole: frozenset[str] = frozenset()  # inputs whose values must be whole numbers (pixel values)
    check: Callable[[Mapping[str, np.ndarray]], str | None] | None = None  # the family's rule across inputs


def output_bytes_per_item(outputs: Sequence[TensorMeta], max_axis: int) -> int:
    """An upper bound on the bytes one batch item's outputs take as raw tensors: dynamic axes other than the
    batch at max_axis. The PixelCNN vstack graph gives 7 x 64 x 28 x 28 floats, 1.4 MB, per image."""
    sizes = ([max_axis if isinstance(d, str) else d for d in t.dims[1:]] for t in outputs)
    return sum(int(np.prod(dims)) * DATATYPES[t.datatype].itemsize for dims, t in zip(sizes, outputs, strict=True))


def check_limits(arrays: dict[str, np.ndarray], specs: Sequence[TensorMeta], limits: Limits) -> None:
    for meta in specs:
        arr = arrays[meta.name]
        for i, d in enumerate(meta.dims):
            if not isinstance(d, str):
                continue
            cap = limits.max_batch if i == 0 else limits.max_axis
            cap += int(match[2]) if (match := _DERIVED.fullmatch(d)) else 0  # `new + 2`: the bound is on `new`
            if arr.shape[i] > cap:
                why = limits.batch_why if i == 0 and limits.batch_why else ""
                _fail(f"input '{meta.name}': dimension {i} ('{d}') is {arr.shape[i]}, above the {cap} allowed{why}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            _fail(f"input '{meta.name}': values must be finite")
        if meta.name in limits.ranges and arr.size:
            lo, hi = limits.ranges[meta.name]
            if arr.min() < lo or arr.max() > hi:
                _fail(f"input '{meta.name}': values must lie in {lo:g}..{hi:g}, got {arr.min():g}..{arr.max():g}")
        if meta.name in limits.whole and arr.dtype.kind == "f" and (arr != np.rint(arr)).any():
            _fail(f"input '{meta.name}': values must be whole numbers, got {arr[arr != np.rint(arr)].flat[0]:.9g}")
    if limits.check is not None and (problem := limits.check(arrays)):
        _fail(problem)


def _outputs(doc: dict, names: Sequence[str], binary_default: bool) -> list[tuple[str, bool]]:
    wanted = doc.get("outputs")
    if wanted is None:
        return [(n, binary_default) for n in names]
    if not isinstance(wanted, list):
        _fail("outputs must be a list")
    out: list[tuple[str, bool]] = []
    for item in wanted:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            _fail("every requested output must be an object with a string 'name'")
        name = item["name"]
        if name not in names:
            _fail(f"unknown output '{name}'; the model's outputs are {sorted(names)}")
        if any(name == n for n, _ in out):
            _fail(f"output '{name}' is requested twice")
        params = _params(item, f"output '{name}'")
        if "classification" in params:
            _fail(f"output '{name}': the classification extension is not supported")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            _fail(f"output '{name}': binary_data must be true or false")
        out.append((name, binary))
    return out


def decode_request(body: bytes, header_length: str | None, inputs: Sequence[TensorMeta],
                   outputs: Sequence[str]) -> InferRequest:
    """Parse and validate an inference request against the model's inputs and output names."""
    doc, rest = split_body(body, header_length)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        _fail("id must be a string")
    binary_default = _params(doc, "request").get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        _fail("binary_data_output must be true or false")
    items = doc.get("inputs")
    if not isinstance(items, list) or not items:
        _fail("inputs must be a non-empty list")
    specs = {m.name: m for m in inputs}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for item in items:
        name, arr, offset = _input(item, specs, rest, offset)
        if name in arrays:
            _fail(f"input '{name}' is given twice")
        arrays[name] = arr
    if offset != len(rest):
        _fail(f"{len(rest)} bytes follow the JSON, but the inputs' binary_data_size add up to {offset}")
    if missing := sorted(set(specs) - set(arrays)):
        _fail(f"missing input{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)}")
    _check_dims(specs, arrays)
    return InferRequest(request_id, arrays, _outputs(doc, list(outputs), binary_default))


def encode_response(model_name: str, model_version: str, request_id: str | None, arrays: dict[str, np.ndarray],
                    outputs: Sequence[tuple[str, bool]]) -> tuple[bytes, int | None]:
    """(body, JSON length when binary outputs follow it, else None)."""
    doc: dict = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    entries, blobs = [], []
    for name, binary in outputs:
        arr = np.ascontiguousarray(arrays[name])
        entry = {"name": name, "datatype": v2_datatype(arr.dtype), "shape": list(arr.shape)}
        if binary:
            blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = (arr.astype(np.float32) if arr.dtype == np.float16 else arr).reshape(-1)
        entries.append(entry)
    doc["outputs"] = entries
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return (head + b"".join(blobs), len(head)) if blobs else (head, None)
