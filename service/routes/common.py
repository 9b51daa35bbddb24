"""Shared pieces of the routes: dependencies, fast JSON responses, image work on or off the event loop, and the
error statuses each kind of route documents."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive

from service.errors import APIError, responses
from service.imaging import decode_images, encode_images
from service.runtime import ModelVersion, Registry

# The statuses besides 200 that routes answer (service/errors.py's policy), for `responses=` on routers and
# routes. 408 and 413 are documented where a body is read: their limits apply to any request, but only a body
# reaches them.
ANY = responses(500)
LOOKUP = responses(404, 503)                   # a model by name or version: unknown, or not ready (yet)
V1_MODEL = {**LOOKUP, **responses(422)}        # a /v1 model endpoint: also an invalid field (body or query)
V1_BODY = responses(400, 408, 413, 504)        # a JSON body: malformed, late or too large; the batcher's deadline
V2_ANY = responses(500, v2=True)
V2_LOOKUP = responses(404, 503, v2=True)


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def not_ready(registry: Registry) -> APIError:
    """The 503 of a registry that is not ready: models still loading, or shutdown under way."""
    if registry.stopping:
        return APIError(503, "shutting_down", "server is shutting down", headers={"Retry-After": "1"})
    return APIError(503, "not_ready", "models are still loading", headers={"Retry-After": "1"})


def resolve(request: Request, family: str, version: int | None) -> ModelVersion:
    """The family's model (named like the family) at the requested or default version; 404 otherwise. A /v1
    POST takes its fields, `model_version` too, in the JSON body: a query parameter there is a 422 naming it
    (`query.model_version`), not something silently ignored."""
    if request.scope["query_string"] and request.method == "POST":
        _refuse_query(request)
    registry = get_registry(request)
    if not registry.ready:
        raise not_ready(registry)
    return registry.get(family, version, family=family)


def _refuse_query(request: Request) -> None:
    # Here rather than a route dependency: FastAPI's dependency machinery costs every request more than the check.
    if request.query_params:
        raise RequestValidationError([
            {"type": "extra_forbidden", "loc": ("query", name), "input": request.query_params.getlist(name),
             "msg": f"{name} goes in the JSON body: /v1 POST routes take no query parameters"}
            for name in dict.fromkeys(request.query_params)])

# Image work of a request with at least this many images runs in a thread instead of on the event loop: request
# images decoded, response images encoded (with the JSON render), logprob's per_pixel maps serialised. Smaller work
# gains nothing there: it holds the GIL, so the loop waits for it as long as if it ran inline, until the
# interpreter's switch interval hands the loop a turn. Anomaly's complexity (five deflates at level 9 per image)
# is the exception that moves early: deflate lets go of the GIL, so in a thread it costs the loop nothing.
# bench/offload.py measures both the hop and the work; docs/benchmarks.md has its figures.
OFFLOAD_DECODE_IMAGES = 64
OFFLOAD_ENCODE_IMAGES = 128
OFFLOAD_PER_PIXEL_MAPS = 64
OFFLOAD_COMPLEXITY = 8

T = TypeVar("T")


async def off_loop_if(offload: bool, fn: Callable[..., T], *args) -> T:
    """fn(*args), in a worker thread when `offload` says the work is large enough to be worth the hop."""
    return await asyncio.to_thread(fn, *args) if offload else fn(*args)


async def read_images(values: list, size: tuple[int, int], field: str = "images") -> np.ndarray:
    """The request's images of `size` (height, width) as (n, height, width) uint8; errors name `field[i]`."""
    return await off_loop_if(len(values) >= OFFLOAD_DECODE_IMAGES, decode_images, values, field, size)


class JSON(Response):
    """orjson-encoded response: numpy-free payloads of plain lists, several times faster than json.dumps."""
    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content)


def reply(mv: ModelVersion, **payload) -> JSON:
    return JSON({"model": mv.name, "model_version": mv.version, **payload})


def _reply_with_images(mv: ModelVersion, images: np.ndarray, fmt: str, payload: dict) -> JSON:
    return reply(mv, **payload, images=encode_images(images, fmt))


async def reply_images(mv: ModelVersion, images: np.ndarray, fmt: str, **payload) -> JSON:
    """reply() with (n, H, W) uint8 `images` encoded in `fmt` as its last field."""
    return await off_loop_if(len(images) >= OFFLOAD_ENCODE_IMAGES, _reply_with_images, mv, images, fmt, payload)


# Batcher work of at least this many images is watched for a disconnect (unless_disconnected); smaller work ends in
# milliseconds, sooner than the watch would pay for itself. PixelCNN sampling is always watched.
WATCHED_ITEMS = 64


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone. Called once the body is read, so receive() has nothing left to give but
    the disconnect: the server sends it when the connection drops, or once the response is complete."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, unless the client disconnects first: then the work is cancelled, which abandons its
    scheduler tickets (queued work is never computed, sequences leave the sampler at the next step), and
    ClientDisconnect ends the request (logged as 499). For routes whose work can take long: a plain request has
    no other way to learn that nobody waits for its answer, and two tasks per request cost more than the
    millisecond routes could gain."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request's own task is cancelled: neither may outlive it
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    await asyncio.wait((task,))  # the cancellation runs its course (tickets abandoned) before the request ends
    if not task.cancelled():
        task.exception()  # it ended otherwise (e.g. its deadline): retrieved, nobody waits for it any more
    raise ClientDisconnect()
