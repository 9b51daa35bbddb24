"""Typed Python client for genserve's /v1 API: `GenserveClient` (blocking) and `AsyncGenserveClient` (asyncio).

Every endpoint is defined once, as a function that builds the request and knows how to parse the answer (a
`_Call`); the two clients differ only in how they send it. Every method returns a pydantic model: the service's
own (service.schemas) where it declares one, else one of genserve_client.responses; those with images are
subclasses whose `array` holds the images decoded to an (n, 28, 28) uint8 array. Images go in as uint8 arrays
(one (28, 28) image, an (n, 28, 28) batch, or a sequence of (28, 28) arrays) and travel as PNG, the API's
compact format. An error answer raises `GenserveError`; transport failures are httpx's own.

`pixelcnn_sample_stream` asks for the sample as server-sent events and yields `Progress` while it is drawn, then
its `SampleResult`; an error after the stream began (an `error` event) raises `GenserveError` too.

Dependencies: httpx, pydantic, numpy and Pillow only (service.schemas and service.imaging import nothing
else), so the client works without FastAPI or ONNX Runtime installed; the service never imports the client.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar
from urllib.parse import quote

import httpx
import numpy as np
from pydantic import BaseModel, PrivateAttr

from genserve_client.responses import Health, ModelDetail, ModelList
from service.imaging import decode_images, encode_images
from service.schemas import (
    AnomalyResponse,
    ImagesResponse,
    LogprobResponse,
    Readiness,
    SampleProgress,
    SampleResponse,
    VaeAttributesResponse,
    VaeEncodeResponse,
)

__all__ = ["AsyncGenserveClient", "GenserveClient", "GenserveError", "ImagesResult", "Progress", "SampleResult"]

T = TypeVar("T")
P = ParamSpec("P")
Images = np.ndarray | Sequence[np.ndarray]
Labels = int | Sequence[int] | None


class GenserveError(Exception):
    """An error answer: HTTP status, the service's error code and message, the first field it names (all of
    them in `fields`), Retry-After in seconds where given, and the X-Request-ID a proxy added."""

    def __init__(self, status: int, code: str, message: str, fields: list[dict[str, str]] | None = None,
                 retry_after: float | None = None, request_id: str | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.fields = status, code, message, fields or []
        self.field: str | None = self.fields[0].get("field") if self.fields else None
        self.retry_after, self.request_id = retry_after, request_id

    @classmethod
    def from_response(cls, r: httpx.Response) -> GenserveError:
        try:
            err = r.json()["error"]
            code, message, fields = str(err["code"]), str(err["message"]), list(err.get("fields") or [])
        except (ValueError, KeyError, TypeError):   # not the service's format, e.g. a proxy's HTML page
            code, message, fields = "http_error", r.text[:500] or r.reason_phrase, []
        try:
            retry_after = float(r.headers["retry-after"])
        except (KeyError, ValueError):
            retry_after = None
        return cls(r.status_code, code, message, fields, retry_after, r.headers.get("x-request-id"))


class _Decoded(BaseModel):
    """Adds `array`: the response's images decoded once, at parse time, so a bad image fails the call."""
    _array: np.ndarray = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        self._array = decode_images(list(self.images))  # type: ignore[attr-defined]

    @property
    def array(self) -> np.ndarray:
        """The images, (n, 28, 28) uint8."""
        return self._array


class SampleResult(SampleResponse, _Decoded):
    """SampleResponse (model, model_version, seed, labels, images) plus `array`."""


class ImagesResult(ImagesResponse, _Decoded):
    """ImagesResponse (model, model_version, images) plus `array`."""


class Progress(SampleProgress):
    """A streamed sample's progress: pixels_done of pixels_total, and the partial images when asked for (`preview`
    as base64 PNG, `array` decoded, both None otherwise)."""

    @property
    def array(self) -> np.ndarray | None:
        """The partial images, (n, 28, 28) uint8, black where not drawn yet; None without preview."""
        return None if self.preview is None else decode_images(list(self.preview))


class _EventParser:
    """Server-sent events from the lines of a stream, by the WHATWG rules: `field: value` lines (one space after
    the colon dropped), several `data` lines joined by newlines, comment lines (a leading ':', e.g. the keep-alive)
    skipped, and a blank line ending the event. Fields other than `event` and `data` are ignored."""

    def __init__(self) -> None:
        self._name, self._data = "message", []

    def feed(self, line: str) -> tuple[str, str] | None:
        """(event name, data) when `line` ends an event, else None."""
        if not line:
            event = (self._name, "\n".join(self._data)) if self._data else None
            self._name, self._data = "message", []
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._name = value
        elif field == "data":
            self._data.append(value)
        return None


class _SampleEvents:
    """A streamed sample's events as answers: Progress, then the SampleResult that ends it; an `error` event raises
    GenserveError with the status it carries. Events of other names are skipped."""

    def __init__(self, r: httpx.Response):
        self._r, self._parser, self.finished = r, _EventParser(), False

    def feed(self, line: str) -> Progress | SampleResult | None:
        if (event := self._parser.feed(line)) is None:
            return None
        name, data = event
        try:
            if name == "progress":
                return Progress.model_validate_json(data)
            if name == "result":
                self.finished = True
                return SampleResult.model_validate_json(data)
            if name == "error":
                body = json.loads(data)
                err = body["error"]
                raise GenserveError(int(body["status"]), str(err["code"]), str(err["message"]),
                                    list(err.get("fields") or []), request_id=self._r.headers.get("x-request-id"))
        except (ValueError, KeyError, TypeError) as e:
            raise GenserveError(self._r.status_code, "invalid_response", f"unexpected {name} event: {e}") from e
        return None

    def end(self) -> None:
        """The stream closed: without a result, that is an error."""
        if not self.finished:
            raise GenserveError(self._r.status_code, "incomplete_stream", "the event stream ended without a result")


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request and the parser of its success answer."""
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    ok: tuple[int, ...] = (200,)
    slow: bool = False                       # PixelCNN sampling: seconds, so the client's sample_timeout

    def finish(self, r: httpx.Response) -> T:
        if r.status_code not in self.ok:
            raise GenserveError.from_response(r)
        try:
            return self.parse(r)
        except ValueError as e:              # bad JSON, or a body that does not fit the schema
            raise GenserveError(r.status_code, "invalid_response", f"unexpected response body: {e}") from e


def _parse(cls: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda r: cls.model_validate(r.json())


def _readiness(r: httpx.Response) -> Readiness:
    try:
        return Readiness.model_validate(r.json())
    except ValueError:
        if r.status_code == 503:         # a 503 that is not the service's "not ready" (a proxy's) is an error
            raise GenserveError.from_response(r) from None
        raise


def _post(path: str, cls: type[BaseModel], slow: bool = False, **fields: Any) -> _Call[Any]:
    """A POST whose body holds the fields that are set: absent ones take the service's defaults."""
    return _Call("POST", path, _parse(cls), json={k: v for k, v in fields.items() if v is not None}, slow=slow)


def _pngs(images: Images) -> list[str]:
    a = np.asarray(images)
    if a.dtype != np.uint8 and (a.dtype.kind not in "iu" or (a.size and (a.min() < 0 or a.max() > 255))):
        raise ValueError(f"images must be uint8 (or integers in 0..255), got dtype {a.dtype}")
    a = a.astype(np.uint8, copy=False)
    return encode_images(a[None] if a.ndim == 2 else a, "png")


def _labels(labels: Labels) -> int | list[int] | None:
    if labels is None or isinstance(labels, int | np.integer):
        return None if labels is None else int(labels)
    return [int(v) for v in labels]


# ----------------------------------------------------------------------------- every endpoint, defined once


def _gan_sample(n: int = 1, *, seed: int | None = None, labels: Labels = None, truncation: float = 1.0,
                model_version: int | None = None) -> _Call[SampleResult]:
    """POST /v1/gan/sample: n class-conditional samples; labels: one digit, n digits, or None (drawn)."""
    return _post("/v1/gan/sample", SampleResult, n=n, seed=seed, labels=_labels(labels), truncation=truncation,
                 model_version=model_version)


def _vae_encode(images: Images, *, model_version: int | None = None) -> _Call[VaeEncodeResponse]:
    """POST /v1/vae/encode: the posterior mean and standard deviation of each image."""
    return _post("/v1/vae/encode", VaeEncodeResponse, images=_pngs(images), model_version=model_version)


def _vae_decode(latents: np.ndarray | Sequence[Sequence[float]], *,
                model_version: int | None = None) -> _Call[ImagesResult]:
    """POST /v1/vae/decode: one image per latent vector ((d,) or (n, d))."""
    z = np.atleast_2d(np.asarray(latents, dtype=np.float64)).tolist()
    return _post("/v1/vae/decode", ImagesResult, latents=z, model_version=model_version)


def _vae_sample(n: int = 1, *, seed: int | None = None, temperature: float = 1.0,
                model_version: int | None = None) -> _Call[SampleResult]:
    """POST /v1/vae/sample: decoded draws z ~ N(0, temperature^2 I)."""
    return _post("/v1/vae/sample", SampleResult, n=n, seed=seed, temperature=temperature,
                 model_version=model_version)


def _vae_attributes(*, model_version: int | None = None) -> _Call[VaeAttributesResponse]:
    """GET /v1/vae/attributes: what vae_edit understands, with training-set mean and std."""
    params = {"model_version": model_version} if model_version is not None else None
    return _Call("GET", "/v1/vae/attributes", _parse(VaeAttributesResponse), params=params)


def _vae_edit(images: Images, edits: dict[str, float], *, model_version: int | None = None) -> _Call[ImagesResult]:
    """POST /v1/vae/edit: move each image along attribute directions (strength in std units, -5..5)."""
    return _post("/v1/vae/edit", ImagesResult, images=_pngs(images), edits={k: float(v) for k, v in edits.items()},
                 model_version=model_version)


def _vae_interpolate(start: np.ndarray, end: np.ndarray, *, steps: int = 8,
                     method: Literal["slerp", "lerp"] = "slerp",
                     model_version: int | None = None) -> _Call[ImagesResult]:
    """POST /v1/vae/interpolate: `steps` images from start to end through the latent space."""
    (a,), (b,) = _pngs(start), _pngs(end)
    return _post("/v1/vae/interpolate", ImagesResult, start=a, end=b, steps=steps, method=method,
                 model_version=model_version)


def _pixelcnn_logprob(images: Images, *, per_pixel: bool = False, labels: Labels = None,
                      model_version: int | None = None) -> _Call[LogprobResponse]:
    """POST /v1/pixelcnn/logprob: exact log p(x) in nats and bits/dim (optionally per pixel, given digits)."""
    return _post("/v1/pixelcnn/logprob", LogprobResponse, images=_pngs(images), per_pixel=per_pixel,
                 labels=_labels(labels), model_version=model_version)


def _pixelcnn_anomaly(images: Images, *, alpha: float | None = None,
                      model_version: int | None = None) -> _Call[AnomalyResponse]:
    """POST /v1/pixelcnn/anomaly: per image a complexity-corrected anomaly score, its p-value against the version's
    held-out reference, and whether p < `alpha` (None: the service's default, 0.01)."""
    return _post("/v1/pixelcnn/anomaly", AnomalyResponse, images=_pngs(images), alpha=alpha,
                 model_version=model_version)


def _pixelcnn_sample(n: int = 1, *, seed: int | None = None, temperature: float = 1.0, labels: Labels = None,
                     guidance: float | None = None, model_version: int | None = None) -> _Call[SampleResult]:
    """POST /v1/pixelcnn/sample: autoregressive samples, seconds per call (uses `sample_timeout`); `guidance`:
    the classifier-free guidance weight (None: the service's default)."""
    return _post("/v1/pixelcnn/sample", SampleResult, slow=True, n=n, seed=seed, temperature=temperature,
                 labels=_labels(labels), guidance=guidance, model_version=model_version)


def _pixelcnn_sample_stream(n: int = 1, *, seed: int | None = None, temperature: float = 1.0, labels: Labels = None,
                            guidance: float | None = None, preview: bool = False,
                            model_version: int | None = None) -> _Call[SampleResult]:
    """POST /v1/pixelcnn/sample as server-sent events: yields Progress (with the partial images if `preview`) while
    the samples are drawn, then their SampleResult, the same as pixelcnn_sample's for the same seed. Leaving the
    loop early closes the connection, and the service stops sampling."""
    call = _pixelcnn_sample(n, seed=seed, temperature=temperature, labels=labels, guidance=guidance,
                            model_version=model_version)
    return _Call(call.method, call.path, call.parse, json={**(call.json or {}), "preview": preview}, slow=True)


def _pixelcnn_complete(image: np.ndarray, n: int = 1, *, known_rows: int | None = None, mask: np.ndarray | None = None,
                       seed: int | None = None, temperature: float = 1.0, labels: Labels = None,
                       guidance: float | None = None, model_version: int | None = None) -> _Call[SampleResult]:
    """POST /v1/pixelcnn/complete: n completions of one (28, 28) image, its top `known_rows` rows (or the pixels
    where the 0/1 `mask` is 1) kept exactly and the rest drawn; seconds per call (uses `sample_timeout`)."""
    (png,) = _pngs(image)
    mask_rows = None if mask is None else np.asarray(mask).astype(int).tolist()
    return _post("/v1/pixelcnn/complete", SampleResult, slow=True, image=png, n=n, known_rows=known_rows,
                 mask=mask_rows, seed=seed, temperature=temperature, labels=_labels(labels), guidance=guidance,
                 model_version=model_version)


def _pixelcnn_complete_stream(image: np.ndarray, n: int = 1, *, known_rows: int | None = None,
                              mask: np.ndarray | None = None, seed: int | None = None, temperature: float = 1.0,
                              labels: Labels = None, guidance: float | None = None, preview: bool = False,
                              model_version: int | None = None) -> _Call[SampleResult]:
    """POST /v1/pixelcnn/complete as server-sent events, like pixelcnn_sample_stream."""
    call = _pixelcnn_complete(image, n, known_rows=known_rows, mask=mask, seed=seed, temperature=temperature,
                              labels=labels, guidance=guidance, model_version=model_version)
    return _Call(call.method, call.path, call.parse, json={**(call.json or {}), "preview": preview}, slow=True)


_EVENT_STREAM = {"accept": "text/event-stream"}


def _models() -> _Call[ModelList]:
    """GET /v1/models: every model with versions, provider, batching, graphs and metrics."""
    return _Call("GET", "/v1/models", _parse(ModelList))


def _model(name: str) -> _Call[ModelDetail]:
    """GET /v1/models/{name}: one model, every version in detail."""
    return _Call("GET", f"/v1/models/{quote(name, safe='')}", _parse(ModelDetail))


def _health() -> _Call[Health]:
    """GET /healthz: status "ok" while the process is alive."""
    return _Call("GET", "/healthz", _parse(Health))


def _ready() -> _Call[Readiness]:
    """GET /readyz: ready, the models loaded, the paths refused, what is missing, and the pid of the worker that
    answered; not ready (503) is an answer, not an error."""
    return _Call("GET", "/readyz", _readiness, ok=(200, 503))


# ----------------------------------------------------------------------------- the two ways of sending


def _method(build: Callable[..., Any], impl: Callable[..., Any]) -> Any:
    """impl, presented as the endpoint: its name, docstring and signature (with self) are the builder's."""
    sig = inspect.signature(build)
    ret = str(sig.return_annotation).removeprefix("_Call[").removesuffix("]")
    impl.__name__ = impl.__qualname__ = build.__name__.lstrip("_")
    impl.__doc__ = build.__doc__
    impl.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *sig.parameters.values()],
        return_annotation=ret)
    return impl


def _sync(build: Callable[P, _Call[T]]) -> Callable[Concatenate[GenserveClient, P], T]:
    def endpoint(self: GenserveClient, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._send(build(*args, **kwargs))
    return _method(build, endpoint)


def _async(build: Callable[P, _Call[T]]) -> Callable[Concatenate[AsyncGenserveClient, P], Awaitable[T]]:
    async def endpoint(self: AsyncGenserveClient, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._send(build(*args, **kwargs))
    return _method(build, endpoint)


def _sync_stream(build: Callable[P, _Call[Any]]) -> Callable[Concatenate[GenserveClient, P],
                                                             Iterator[Progress | SampleResult]]:
    def endpoint(self: GenserveClient, *args: P.args, **kwargs: P.kwargs) -> Iterator[Progress | SampleResult]:
        return self._events(build(*args, **kwargs))
    method = _method(build, endpoint)
    method.__signature__ = method.__signature__.replace(return_annotation="Iterator[Progress | SampleResult]")
    return method


def _async_stream(build: Callable[P, _Call[Any]]) -> Callable[Concatenate[AsyncGenserveClient, P],
                                                               AsyncIterator[Progress | SampleResult]]:
    def endpoint(self: AsyncGenserveClient, *args: P.args,
                 **kwargs: P.kwargs) -> AsyncIterator[Progress | SampleResult]:
        return self._events(build(*args, **kwargs))
    method = _method(build, endpoint)
    method.__signature__ = method.__signature__.replace(return_annotation="AsyncIterator[Progress | SampleResult]")
    return method


class _Client:
    """What both clients hold: the httpx client (a new one, or `http`, e.g. with a test transport, which is then
    not closed here) and the timeouts. `sample_timeout` (for PixelCNN sampling) exceeds the service's default
    deadline (300 s) so that its 504 arrives first; None: the httpx client's timeout."""

    _http_class: type                        # httpx.Client or httpx.AsyncClient

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, timeout: float = 60.0,
                 sample_timeout: float | None = 330.0, headers: dict[str, str] | None = None, http: Any = None):
        self._owns_http = http is None
        self._http = http if http is not None else self._http_class(base_url=base_url, timeout=timeout,
                                                                     headers=headers)
        self.sample_timeout = sample_timeout

    def _args(self, call: _Call[Any]) -> dict[str, Any]:
        args: dict[str, Any] = {"json": call.json, "params": call.params}
        if call.slow and self.sample_timeout is not None:
            args["timeout"] = self.sample_timeout
        return args


class GenserveClient(_Client):
    """Blocking client on httpx.Client."""

    _http_class = httpx.Client

    def _send(self, call: _Call[T]) -> T:
        return call.finish(self._http.request(call.method, call.path, **self._args(call)))

    def _events(self, call: _Call[Any]) -> Iterator[Progress | SampleResult]:
        with self._http.stream(call.method, call.path, headers=_EVENT_STREAM, **self._args(call)) as r:
            if r.status_code != 200:
                r.read()
                raise GenserveError.from_response(r)
            events = _SampleEvents(r)
            for line in r.iter_lines():
                if (item := events.feed(line)) is not None:
                    yield item
                    if events.finished:
                        return
            events.end()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> GenserveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    gan_sample = _sync(_gan_sample)
    vae_encode = _sync(_vae_encode)
    vae_decode = _sync(_vae_decode)
    vae_sample = _sync(_vae_sample)
    vae_attributes = _sync(_vae_attributes)
    vae_edit = _sync(_vae_edit)
    vae_interpolate = _sync(_vae_interpolate)
    pixelcnn_logprob = _sync(_pixelcnn_logprob)
    pixelcnn_anomaly = _sync(_pixelcnn_anomaly)
    pixelcnn_sample = _sync(_pixelcnn_sample)
    pixelcnn_sample_stream = _sync_stream(_pixelcnn_sample_stream)
    pixelcnn_complete = _sync(_pixelcnn_complete)
    pixelcnn_complete_stream = _sync_stream(_pixelcnn_complete_stream)
    models = _sync(_models)
    model = _sync(_model)
    health = _sync(_health)
    ready = _sync(_ready)


class AsyncGenserveClient(_Client):
    """asyncio client on httpx.AsyncClient."""

    _http_class = httpx.AsyncClient

    async def _send(self, call: _Call[T]) -> T:
        return call.finish(await self._http.request(call.method, call.path, **self._args(call)))

    async def _events(self, call: _Call[Any]) -> AsyncIterator[Progress | SampleResult]:
        async with self._http.stream(call.method, call.path, headers=_EVENT_STREAM, **self._args(call)) as r:
            if r.status_code != 200:
                await r.aread()
                raise GenserveError.from_response(r)
            events = _SampleEvents(r)
            async for line in r.aiter_lines():
                if (item := events.feed(line)) is not None:
                    yield item
                    if events.finished:
                        return
            events.end()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncGenserveClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    gan_sample = _async(_gan_sample)
    vae_encode = _async(_vae_encode)
    vae_decode = _async(_vae_decode)
    vae_sample = _async(_vae_sample)
    vae_attributes = _async(_vae_attributes)
    vae_edit = _async(_vae_edit)
    vae_interpolate = _async(_vae_interpolate)
    pixelcnn_logprob = _async(_pixelcnn_logprob)
    pixelcnn_anomaly = _async(_pixelcnn_anomaly)
    pixelcnn_sample = _async(_pixelcnn_sample)
    pixelcnn_sample_stream = _async_stream(_pixelcnn_sample_stream)
    pixelcnn_complete = _async(_pixelcnn_complete)
    pixelcnn_complete_stream = _async_stream(_pixelcnn_complete_stream)
    models = _async(_models)
    model = _async(_model)
    health = _async(_health)
    ready = _async(_ready)
