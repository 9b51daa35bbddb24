"""Open Inference Protocol (KServe V2, REST): raw tensor access to every ONNX graph in the model store.

Model names: each graph of each model in the store is one V2 model named `<model>.<graph>` (model names never
hold a dot, so the name splits at its first one):

    gan.generator    pixelcnn.logprob    pixelcnn.vstack    pixelcnn.hrow    vae.encoder    vae.decoder
    pixelcnn.vstep   pixelcnn.hstep      (PixelCNN versions exported with the step graphs)

A V2 model's versions are the store versions of its model that have that graph (e.g. "1"); without a version
the highest is used, as in /v1. Inputs and outputs are the graph's own (name, datatype such as FP32 or INT64,
shape with -1 for a dynamic axis), and `platform` is "onnxruntime_onnx".

Endpoints (prefix /v2): server metadata `GET /v2` (extensions: binary_tensor_data), `GET /v2/health/live`,
`GET /v2/health/ready`, model metadata `GET /v2/models/{name}[/versions/{v}]`, model readiness `GET .../ready`,
inference `POST .../infer` (JSON tensors, or the binary tensor data extension: see service/v2_codec.py), and
`POST /v2/repository/index` listing every V2 model and version.

Inference goes through the graph's batcher, the one /v1 uses: V2 and /v1 requests are batched together and
counted in the same metrics. Status codes come from service/errors.py, which gives /v2 paths the protocol's
error body {"error": "message"}: unknown model or version 404, a request that does not fit the model 400
(naming the input or output), not ready 503 (also for the ready endpoints, as KServe's own server does),
queue full 503, deadline 504.
"""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from service import families
from service.auth import require_admin
from service.errors import APIError, responses
from service.routes.common import JSON, V2_ANY, V2_LOOKUP, get_registry, not_ready
from service.runtime import ModelNotFound, ModelVersion, Registry, from_onnxruntime
from service.schemas import RepositoryLoadResponse, RepositoryUnloadResponse
from service.store import ort_dtype
from service.v2_codec import (
    DATATYPES,
    Limits,
    TensorError,
    TensorMeta,
    check_limits,
    decimal,
    decode_request,
    encode_response,
    output_bytes_per_item,
    v2_datatype,
)

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"], responses=V2_ANY)
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data"]
_OFFLOAD_BYTES = 1 << 20          # decode/encode bodies above this off the event loop


def v2_models(reg: Registry) -> dict[str, dict[int, ModelVersion]]:
    """V2 model name -> {version: the ModelVersion holding that graph}."""
    out: dict[str, dict[int, ModelVersion]] = {}
    for model, versions in sorted(reg.models.items()):
        for v, mv in sorted(versions.items()):
            for graph in mv.manifest.graphs:
                out.setdefault(f"{model}.{graph}", {})[v] = mv
    return out


def _resolve(request: Request, name: str, version: str | None) -> tuple[ModelVersion, str]:
    """(model version, graph) of a V2 model name and optional version; 404 for unknown ones, 503 while the
    store is still loading (a model may not be known yet)."""
    reg = get_registry(request)
    model, _, graph = name.partition(".")
    versions = {v: m for v, m in reg.models.get(model, {}).items() if graph in m.manifest.graphs}
    if version is None:
        mv = versions[reg.default_version(model, versions)] if versions else None
    else:
        mv = versions.get(v) if (v := decimal(version, 9)) is not None else None
    if mv is not None:
        return mv, graph
    if not reg.ready:
        raise not_ready(reg)
    if not versions:
        raise ModelNotFound(f"unknown model '{name}'; models: {sorted(v2_models(reg))}")
    raise ModelNotFound(f"model '{name}' has no version '{version}'; versions: {[str(v) for v in sorted(versions)]}")


def _dims(t) -> tuple[int | str, ...]:
    """An onnxruntime NodeArg's shape, dynamic axes by their symbolic name (unnamed ones each unique)."""
    return tuple(d if isinstance(d, int) else (d or f"{t.name}:{i}") for i, d in enumerate(t.shape))


def graph_tensors(mv: ModelVersion, graph: str) -> tuple[list[TensorMeta], list[TensorMeta]]:
    """(inputs, outputs) of one graph as its session has them (the store checked them against the manifest)."""
    sess = mv.loaded.sessions[graph]
    return ([TensorMeta(t.name, v2_datatype(ort_dtype(t)), _dims(t)) for t in sess.get_inputs()],
            [TensorMeta(t.name, v2_datatype(ort_dtype(t)), _dims(t)) for t in sess.get_outputs()])


@router.get("")
async def server_metadata(request: Request):
    return JSON({"name": "genserve", "version": request.app.version, "extensions": EXTENSIONS})


@router.get("/health/live")
async def live():
    return JSON({"live": True})


@router.get("/health/ready", responses=responses(503, v2=True, always_retry_after=False))
async def ready(request: Request):
    """Ready as /readyz is: loaded, and every required model has a version serving."""
    if not (reg := get_registry(request)).ready:
        raise not_ready(reg)
    if reg.missing:  # loaded, but a required model has nothing serving: restarting, not waiting, mends that
        raise APIError(503, "not_ready", f"required models have no version serving: {sorted(reg.missing)}")
    return JSON({"ready": True})


# 503: a POST past the in-flight limit of its path (service.middleware), this one too
@router.post("/repository/index", responses=responses(503, v2=True))
async def repository_index(request: Request):
    """Every V2 model and version (Triton's model repository index); all are READY once the store is."""
    reg = get_registry(request)
    state = "READY" if reg.ready else "LOADING"
    return JSON([{"name": name, "version": str(v), "state": state}
                 for name, versions in v2_models(reg).items() for v in sorted(versions)])


# Triton's repository API, so that tritonclient's load_model and unload_model work unchanged. `model` is a store
# model (`gan`) or one of its graphs (`gan.generator`): either acts on the whole model.
_CONTROL = responses(400, 404, 409, 503, v2=True)


async def _no_parameters(request: Request) -> None:
    """Triton's load takes `parameters` (a config override, files): none are supported, and saying so beats
    ignoring them. Unload's `unload_dependents` is accepted: no model here depends on another."""
    body = await request.body()
    if body.strip():
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise TensorError("the body is not valid JSON") from None
        parameters = data.get("parameters", {}) if isinstance(data, dict) else None
        if not isinstance(parameters, dict) or set(data) - {"parameters"} or (
                set(parameters) - {"unload_dependents"}):
            raise TensorError("load and unload take no parameters (but unload_dependents): a model's config "
                              "comes from its manifest")


# With several workers the worker that answers has applied the change; `workers` says how many others have
# (tritonclient reads only the status of these answers).
@router.post("/repository/models/{model}/load", response_model=RepositoryLoadResponse, responses=_CONTROL,
             dependencies=[Depends(require_admin)])
async def repository_load(model: str, request: Request):
    """Rescan the model's folder and apply its version policy: new valid versions built and warmed up, then served
    in one step; versions gone from disk or from the policy drained. A refused version is a 400 naming it, and
    what served keeps serving. With several workers every worker then serves the same versions: `workers` tells
    how many have."""
    repository = request.app.state.repository
    repository.check_control()
    await _no_parameters(request)
    name = model.partition(".")[0]
    result = await repository.load(name)
    return JSON({"model": name, "serving": result.serving, "added": result.added, "removed": result.removed,
                 "workers": result.workers.as_json()})


@router.post("/repository/models/{model}/unload", response_model=RepositoryUnloadResponse, responses=_CONTROL,
             dependencies=[Depends(require_admin)])
async def repository_unload(model: str, request: Request):
    """Stop serving every version of the model (each drained, then released) until it is loaded again, on every
    worker: `workers` tells how many have."""
    repository = request.app.state.repository
    repository.check_control()
    await _no_parameters(request)
    name = model.partition(".")[0]
    result = await repository.unload(name)
    return JSON({"model": name, "unloaded": result.unloaded, "workers": result.workers.as_json()})


def _metadata(request: Request, name: str, version: str | None) -> JSON:
    mv, graph = _resolve(request, name, version)
    versions = v2_models(get_registry(request)).get(name, {mv.version: mv})
    inputs, outputs = graph_tensors(mv, graph)
    return JSON({"name": name, "versions": [str(v) for v in sorted(versions)], "platform": PLATFORM,
                 "inputs": [t.metadata() for t in inputs], "outputs": [t.metadata() for t in outputs]})


def _ready(request: Request, name: str, version: str | None) -> JSON:
    mv, _ = _resolve(request, name, version)
    if not (reg := get_registry(request)).ready:
        raise not_ready(reg)
    return JSON({"name": name, "version": str(mv.version), "ready": True})


# Each endpoint with and without a version, as thin pairs: one function under both paths would turn
# `version` into a query parameter of the unversioned path.
@router.get("/models/{name}", responses=V2_LOOKUP)
async def model_metadata(name: str, request: Request):
    return _metadata(request, name, None)


@router.get("/models/{name}/versions/{version}", responses=V2_LOOKUP)
async def model_version_metadata(name: str, version: str, request: Request):
    return _metadata(request, name, version)


@router.get("/models/{name}/ready", responses=V2_LOOKUP)
async def model_ready(name: str, request: Request):
    return _ready(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", responses=V2_LOOKUP)
async def model_version_ready(name: str, version: str, request: Request):
    return _ready(request, name, version)


def _ort_rejected(exc: Exception) -> bool:
    """ONNX Runtime's INVALID_ARGUMENT: the values do not fit the graph (e.g. a label outside the embedding's
    range), a request problem; onnxruntime's other failures stay server errors."""
    return from_onnxruntime(exc) and type(exc).__name__ == "InvalidArgument"


# The body is read raw (JSON, or JSON followed by binary tensors), so the spec is declared by hand: the protocol's
# request (see service/v2_codec.py). Names, datatypes and shapes must also be the model's (GET /v2/models/{name}).
_PARAMETERS = {"type": "object", "description": "protocol parameters; shared memory is not supported"}
_INFER_REQUEST = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string", "description": "echoed in the response"},
    "parameters": {**_PARAMETERS, "properties": {"binary_data_output": {"type": "boolean"}}},
    "inputs": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["name", "datatype", "shape"], "properties": {
            "name": {"type": "string"},
            "datatype": {"enum": sorted(DATATYPES)},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}},
            "parameters": {**_PARAMETERS, "properties": {"binary_data_size": {
                "type": "integer", "minimum": 0, "description": "its bytes follow the JSON, in place of data"}}},
            "data": {"type": "array", "description": "the elements in row-major order, flat or nested"}}}},
    "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"},
        "parameters": {**_PARAMETERS, "properties": {"binary_data": {"type": "boolean"}}}}}}}}
_INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _INFER_REQUEST},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "JSON header (its length in Inference-Header-Content-Length), "
                                                "then the binary tensors"}}}}
# binary outputs (the extension) come back as application/octet-stream, likewise a JSON header and the tensors
_INFER_RESPONSES = {
    200: {"content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"},
        "description": "JSON header (its length in Inference-Header-Content-Length), then the binary tensors"}}},
    **V2_LOOKUP, **responses(400, 408, 413, 504, v2=True)}


@router.post("/models/{name}/infer", openapi_extra=_INFER_BODY, responses=_INFER_RESPONSES)
async def infer(name: str, request: Request) -> Response:
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", openapi_extra=_INFER_BODY, responses=_INFER_RESPONSES)
async def infer_version(name: str, version: str, request: Request) -> Response:
    return await _infer(request, name, version)


def _limits(mv: ModelVersion, outputs: list[TensorMeta], settings) -> Limits:
    """The family's rules for input values and dynamic axes (service.families, the rules /v1 follows too), and
    a batch capped by the queue and by the outputs' size: 256 PixelCNN vstack images would answer hundreds of MB
    of tensors, more again as JSON."""
    rules = families.tensor_rules(mv)
    per_item = output_bytes_per_item(outputs, rules.max_axis)
    by_size = max(1, settings.v2_max_output_bytes // max(per_item, 1))
    max_batch = min(settings.v2_max_batch, mv.batching.max_queue_items, by_size)
    why = (f" (outputs of up to {per_item:,} bytes an item, GENSERVE_V2_MAX_OUTPUT_BYTES="
           f"{settings.v2_max_output_bytes:,} a request)") if max_batch == by_size else ""
    return Limits(max_batch=max_batch, max_axis=rules.max_axis, ranges=rules.ranges, batch_why=why,
                  whole=rules.whole, check=rules.check)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    mv, graph = _resolve(request, name, version)
    if not (reg := get_registry(request)).ready:
        raise not_ready(reg)
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise TensorError("compressed request bodies (Content-Encoding) are not supported")
    inputs, outputs = graph_tensors(mv, graph)
    body = await request.body()
    header_length = request.headers.get("inference-header-content-length")
    args = (body, header_length, inputs, [t.name for t in outputs])
    req = await asyncio.to_thread(decode_request, *args) if len(body) > _OFFLOAD_BYTES else decode_request(*args)
    check_limits(req.inputs, inputs, _limits(mv, outputs, request.app.state.settings))
    try:
        result = await mv.run(graph, req.inputs)
    except Exception as e:
        if _ort_rejected(e):
            detail = str(e).splitlines()[0].split("INVALID_ARGUMENT : ", 1)[-1][:400]
            raise TensorError(f"model '{name}' rejected the inputs: {detail}") from None
        raise
    args = (name, str(mv.version), req.id, result, req.outputs)
    big = sum(result[o].nbytes for o, _ in req.outputs) > _OFFLOAD_BYTES
    payload, json_length = await asyncio.to_thread(encode_response, *args) if big else encode_response(*args)
    if json_length is None:
        return Response(payload, media_type="application/json")
    return Response(payload, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(json_length)})
