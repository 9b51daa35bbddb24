"""genserve_client against the in-process app on the shipped models: every endpoint through both clients, compared
with the raw API, and the error type. The sync client runs over Starlette's TestClient (an httpx.Client that
drives the app and its lifespan); the async one over httpx.ASGITransport, with the lifespan entered here."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
import json
import subprocess
import sys
import tomllib

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import BaseModel

from genserve_client import (
    AsyncGenserveClient,
    GenserveClient,
    GenserveError,
    Health,
    ModelDetail,
    ModelList,
    Progress,
    SampleResult,
)
from service.app import create_app
from service.imaging import decode_images
from service.schemas import (
    AnomalyResponse,
    ImagesResponse,
    LogprobResponse,
    Readiness,
    SampleResponse,
    VaeAttributesResponse,
    VaeEncodeResponse,
)
from service.settings import Settings
from tests.api.conftest import wait_ready
from tests.conftest import REPO

SETTINGS = {"store_path": REPO / "models_store", "warmup": False, "intra_op_threads": 1, "worker_threads": 1}
RETURNS = {"gan_sample": SampleResponse, "vae_sample": SampleResponse, "pixelcnn_sample": SampleResponse,
           "pixelcnn_complete": SampleResponse,
           "vae_decode": ImagesResponse, "vae_edit": ImagesResponse, "vae_interpolate": ImagesResponse,
           "vae_encode": VaeEncodeResponse, "vae_attributes": VaeAttributesResponse,
           "pixelcnn_logprob": LogprobResponse, "pixelcnn_anomaly": AnomalyResponse,
           "models": ModelList, "model": ModelDetail, "health": Health,
           "ready": Readiness}
ENDPOINTS = sorted(RETURNS)
STREAMS = {"pixelcnn_sample_stream": "pixelcnn_sample",   # iterators over events -> the plain call they end like
           "pixelcnn_complete_stream": "pixelcnn_complete"}


@pytest.fixture(scope="module")
def app_client():
    with TestClient(create_app(Settings(**SETTINGS))) as tc:
        wait_ready(tc)
        yield tc


@pytest.fixture(scope="module")
def gs(app_client):
    # sample_timeout=None: the TestClient warns about per-request timeouts (it has no network to time out).
    with GenserveClient(http=app_client, sample_timeout=None) as client:
        yield client


def cases(images: np.ndarray) -> dict[str, tuple[tuple, dict, str, str, dict | None]]:
    """Per endpoint: the client call (args, kwargs) and the same request in raw JSON (method, path, body), with
    images sent as arrays, the API's other input format."""
    z = np.linspace(-1.0, 1.0, 32).reshape(2, 16)
    raw = images.tolist()
    return {
        "health": ((), {}, "GET", "/healthz", None),
        "ready": ((), {}, "GET", "/readyz", None),
        "models": ((), {}, "GET", "/v1/models", None),
        "model": (("vae",), {}, "GET", "/v1/models/vae", None),
        "gan_sample": ((2,), {"seed": 7, "labels": [3, 8], "truncation": 0.8}, "POST", "/v1/gan/sample",
                       {"n": 2, "seed": 7, "labels": [3, 8], "truncation": 0.8}),
        "vae_encode": ((images,), {}, "POST", "/v1/vae/encode", {"images": raw}),
        "vae_decode": ((z,), {}, "POST", "/v1/vae/decode", {"latents": z.tolist()}),
        "vae_sample": ((2,), {"seed": 1, "temperature": 0.9}, "POST", "/v1/vae/sample",
                       {"n": 2, "seed": 1, "temperature": 0.9}),
        "vae_attributes": ((), {"model_version": 1}, "GET", "/v1/vae/attributes?model_version=1", None),
        "vae_edit": ((images[:2], {"thickness": 1.5, "slant": -1.0}), {}, "POST", "/v1/vae/edit",
                     {"images": raw[:2], "edits": {"thickness": 1.5, "slant": -1.0}}),
        "vae_interpolate": ((images[0], images[1]), {"steps": 5, "method": "lerp"}, "POST", "/v1/vae/interpolate",
                            {"start": raw[0], "end": raw[1], "steps": 5, "method": "lerp"}),
        "pixelcnn_logprob": ((images,), {"per_pixel": True, "labels": [7, 2, 1, 0]}, "POST", "/v1/pixelcnn/logprob",
                             {"images": raw, "per_pixel": True, "labels": [7, 2, 1, 0]}),
        "pixelcnn_anomaly": ((images,), {"alpha": 0.05}, "POST", "/v1/pixelcnn/anomaly",
                             {"images": raw, "alpha": 0.05}),
        "pixelcnn_sample": ((1,), {"seed": 3, "labels": np.int64(5)}, "POST", "/v1/pixelcnn/sample",
                            {"n": 1, "seed": 3, "labels": 5}),
        "pixelcnn_complete": ((images[0], 2), {"known_rows": 20, "seed": 4, "labels": 7}, "POST",
                              "/v1/pixelcnn/complete", {"image": raw[0], "n": 2, "known_rows": 20, "seed": 4,
                                                        "labels": 7}),
    }


def as_json(result: BaseModel) -> object:
    """A result as the JSON it was parsed from (fields the answer did not carry stay out)."""
    return result.model_dump(mode="json", exclude_unset=True)


def test_cases_cover_every_endpoint(digit_images):
    public = {n for n in dir(GenserveClient) if not n.startswith("_") and n not in ("close",)}
    assert public - set(STREAMS) == set(ENDPOINTS) == set(cases(digit_images))


@pytest.mark.parametrize("name", ENDPOINTS)
def test_sync_client_matches_the_raw_api(name, gs, app_client, digit_images):
    args, kwargs, method, path, body = cases(digit_images)[name]
    result = getattr(gs, name)(*args, **kwargs)
    raw = app_client.request(method, path, json=body)
    assert raw.status_code == 200, raw.text
    assert isinstance(result, RETURNS[name])
    got, expected = as_json(result), raw.json()
    if name == "models":  # the process's memory moves between the two requests: its fields, not its values
        assert set(got.pop("process")) == set(expected.pop("process"))
    assert got == expected                      # PNG in (client) and arrays in (raw): the same answer
    if isinstance(result, SampleResponse | ImagesResponse):
        assert result.array.dtype == np.uint8 and result.array.shape == (len(result.images), 28, 28)
        assert np.array_equal(result.array, decode_images(raw.json()["images"]))


@contextlib.asynccontextmanager
async def ready_async_client():
    """An AsyncGenserveClient on an app of its own (its batchers live on the calling loop), once it is ready."""
    app = create_app(Settings(**SETTINGS))
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://genserve")
        async with http, AsyncGenserveClient(http=http) as ags:
            for _ in range(600):                                 # bounded: 60 s
                if (await ags.ready()).ready:
                    break
                await asyncio.sleep(0.1)
            yield ags


def test_async_client_gives_the_same_answers(gs, digit_images):
    expected = {name: as_json(getattr(gs, name)(*a, **kw)) for name, (a, kw, *_) in cases(digit_images).items()
                if name != "ready"}                              # ready differs: another app instance

    async def main() -> dict:
        async with ready_async_client() as ags:
            got = {name: as_json(await getattr(ags, name)(*a, **kw))
                   for name, (a, kw, *_) in cases(digit_images).items()}
            with pytest.raises(GenserveError) as err:
                await ags.gan_sample(1000)
            assert (err.value.status, err.value.field) == (422, "n")
            return got

    got = asyncio.run(main())
    assert got.pop("ready")["ready"] is True
    assert set(got["models"].pop("process")) == set(expected["models"].pop("process"))  # another app: its figures
    assert got == expected


def test_service_errors_raise_a_typed_exception(gs, digit_images):
    cases_ = [
        (lambda: gs.gan_sample(1000), 422, "invalid_request", "n"),
        (lambda: gs.model("nope"), 404, "not_found", None),
        (lambda: gs.vae_edit(digit_images[:1], {"boldness": 1.0}), 422, "invalid_request", "edits.boldness"),
        (lambda: gs.vae_encode(np.zeros((1, 27, 28), np.uint8)), 422, "invalid_image", "images[0]"),
        (lambda: gs.pixelcnn_logprob(digit_images, labels=[1]), 422, "invalid_request", "labels"),
        (lambda: gs.vae_decode(np.zeros((1, 3))), 422, "invalid_request", "latents[0]"),
    ]
    for call, status, code, field in cases_:
        with pytest.raises(GenserveError) as err:
            call()
        e = err.value
        assert (e.status, e.code, e.field) == (status, code, field), e
        assert e.message and str(e).startswith(f"{status} {code}")
        assert (e.fields[0]["field"] if e.fields else None) == field


def test_sample_stream_yields_progress_then_the_plain_result(gs):
    items = list(gs.pixelcnn_sample_stream(2, seed=3, labels=[5, 1], preview=True))
    progress, result = items[:-1], items[-1]
    assert progress and all(isinstance(p, Progress) for p in progress) and isinstance(result, SampleResult)
    assert all(p.pixels_total == 2 * 28 * 28 and p.array.shape == (2, 28, 28) for p in progress)
    assert as_json(result) == as_json(gs.pixelcnn_sample(2, seed=3, labels=[5, 1]))
    assert [p.preview for p in gs.pixelcnn_sample_stream(1, seed=3) if isinstance(p, Progress)][0] is None

    async def main():                             # the async twin, on its own app
        async with ready_async_client() as ags:
            items = [item async for item in ags.pixelcnn_sample_stream(2, seed=3, labels=[5, 1])]
            with pytest.raises(GenserveError) as err:
                _ = [item async for item in ags.pixelcnn_sample_stream(2, temperature=5.0)]
            return items, err.value

    items, err = asyncio.run(main())
    assert as_json(items[-1]) == as_json(result) and all(isinstance(p, Progress) for p in items[:-1])
    assert (err.status, err.code, err.field) == (422, "invalid_request", "temperature")


def test_sample_stream_errors():
    """A refusal before the stream (plain JSON), an error event, a stream cut short, a malformed event."""
    with pytest.raises(GenserveError) as err:
        list(mock_client(lambda r: httpx.Response(503, json={"error": {"code": "overloaded", "message": "full"}},
                                                  headers={"retry-after": "1"})).pixelcnn_sample_stream(2))
    assert (err.value.status, err.value.code, err.value.retry_after) == (503, "overloaded", 1.0)

    def stream(text: str):
        seen = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
        return mock_client(handler).pixelcnn_sample_stream(1, seed=4, preview=True), seen

    start = 'event: progress\ndata: {"pixels_done": 0, "pixels_total": 784}\n\n: keep-alive\n\n'
    events, seen = stream(start + 'event: error\ndata: {"status": 504, "error": {"code": "timeout",\n'
                                  'data: "message": "late"}}\n\n')
    assert next(events) == Progress(pixels_done=0, pixels_total=784)
    with pytest.raises(GenserveError) as err:
        next(events)
    assert (err.value.status, err.value.code, err.value.message) == (504, "timeout", "late")
    assert seen[0].headers["accept"] == "text/event-stream"
    assert json.loads(seen[0].content) == {"n": 1, "seed": 4, "temperature": 1.0, "preview": True}
    for text, code in [(start, "incomplete_stream"), ('event: progress\ndata: {"pixels": 1}\n\n', "invalid_response")]:
        with pytest.raises(GenserveError) as err:
            list(stream(text)[0])
        assert err.value.code == code


def test_images_are_checked_before_sending(gs, digit_images):
    with pytest.raises(ValueError, match="uint8"):
        gs.vae_encode(digit_images.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        gs.vae_encode(np.full((1, 28, 28), 300))
    as_int = gs.vae_encode(digit_images.astype(np.int64)).latents
    assert as_int == gs.vae_encode(list(digit_images)).latents == gs.vae_encode(digit_images).latents


def mock_client(handler) -> GenserveClient:
    return GenserveClient(http=httpx.Client(transport=httpx.MockTransport(handler), base_url="http://mock"))


def test_answers_from_elsewhere_and_not_ready():
    """What the service itself never sends here: a proxy's HTML page, 503 not_ready, a broken 200."""
    html = mock_client(lambda r: httpx.Response(502, text="<html>bad gateway</html>",
                                                headers={"x-request-id": "abc"}))
    with pytest.raises(GenserveError) as err:
        html.vae_sample()
    assert (err.value.status, err.value.code, err.value.request_id) == (502, "http_error", "abc")
    assert "bad gateway" in err.value.message
    with pytest.raises(GenserveError):
        html.ready()

    not_ready = {"ready": False, "models": {}, "refused": [], "missing": {}, "pid": 42}

    def loading(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/readyz":
            return httpx.Response(503, json=not_ready)
        return httpx.Response(503, json={"error": {"code": "not_ready", "message": "models are still loading"}},
                              headers={"retry-after": "1"})

    gs = mock_client(loading)
    assert gs.ready() == Readiness(**not_ready)
    with pytest.raises(GenserveError) as err:
        gs.gan_sample()
    assert (err.value.status, err.value.code, err.value.retry_after, err.value.field) == (503, "not_ready", 1.0, None)
    with pytest.raises(GenserveError) as err:
        mock_client(lambda r: httpx.Response(200, json={"model": "gan"})).gan_sample()
    assert err.value.code == "invalid_response"


def test_both_clients_offer_the_same_documented_endpoints():
    for name in ENDPOINTS:
        sync, asyn = getattr(GenserveClient, name), getattr(AsyncGenserveClient, name)
        assert inspect.signature(sync) == inspect.signature(asyn)
        assert sync.__doc__ and sync.__doc__ == asyn.__doc__ and inspect.iscoroutinefunction(asyn)
    for name, plain in STREAMS.items():
        sync, asyn = getattr(GenserveClient, name), getattr(AsyncGenserveClient, name)
        assert sync.__doc__ and sync.__doc__ == asyn.__doc__
        assert str(inspect.signature(sync)).endswith("-> 'Iterator[Progress | SampleResult]'")
        assert str(inspect.signature(asyn)).endswith("-> 'AsyncIterator[Progress | SampleResult]'")
        # the plain call's parameters, and preview
        assert list(inspect.signature(sync).parameters) == [*inspect.signature(getattr(GenserveClient, plain))
                                                            .parameters][:-1] + ["preview", "model_version"]
    with GenserveClient("http://x") as bound:
        assert list(inspect.signature(bound.gan_sample).parameters)[0] == "n"


def _installed_by(requirements: list[str]) -> set[str]:
    """The distributions that installing these requirements brings in, by their metadata here (markers evaluated
    for this interpreter, extras followed), canonical names."""
    seen: set[tuple[str, str]] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        for wanted in ("", *sorted(req.extras)):
            if (name, wanted) not in seen:
                seen.add((name, wanted))
                todo += [(Requirement(line), wanted) for line in importlib.metadata.requires(name) or []]
    return {name for name, _ in seen}


def test_client_runs_with_only_its_extra_installed():
    """What `pip install 'genserve[client]'` installs is enough: in a child process that cannot import any installed
    distribution except the core dependencies, the `client` extra and what they require, the client imports and
    parses an answer with images. Optional imports of those packages fail there as they would in such a venv."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = _installed_by(project["dependencies"] + project["optional-dependencies"]["client"])
    blocked = sorted(module for module, dists in importlib.metadata.packages_distributions().items()
                     if not any(canonicalize_name(d) in wanted for d in dists)
                     and module not in ("service", "genserve_client"))
    assert {"fastapi", "onnxruntime"} <= set(blocked)
    code = f"""
import json, sys
blocked = set({blocked!r})
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError("not installed by the client extra: " + name)
sys.meta_path.insert(0, Block())
before = set(sys.modules)
import httpx, numpy as np
import genserve_client as gc
from service.imaging import encode_images
png = encode_images(np.zeros((1, 28, 28), np.uint8), "png")
answer = {{"model": "gan", "model_version": 1, "seed": 5, "labels": [3], "images": png}}
http = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, json=answer)), base_url="http://m")
with gc.GenserveClient(http=http) as gs:
    assert gs.gan_sample(1).array.shape == (1, 28, 28)
print(json.dumps(sorted({{m.split(".")[0] for m in set(sys.modules) - before}})))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout))
    assert {"genserve_client", "service", "httpx", "numpy", "PIL", "pydantic"} <= loaded
    assert not loaded & {"fastapi", "starlette", "onnxruntime", "uvicorn", "torch", "prometheus_client", "orjson",
                         "pydantic_settings"}


def test_the_client_ships_in_the_wheel():
    """pyproject.toml's package list holds genserve_client (the wheel of `pip install 'genserve[client]'` has it);
    tests/unit/test_layout.py checks that no module of the service imports it."""
    import setuptools

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = setuptools.find_packages(where=str(REPO), include=include)
    assert "genserve_client" in packages and "service" in packages
    assert not any(p.startswith(("tests", "docs", "deploy")) for p in packages)
