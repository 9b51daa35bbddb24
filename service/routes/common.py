"""Shared pieces of the routes: dependencies, seeds, labels, fast JSON responses, and the error statuses each kind
of route documents."""

from __future__ import annotations

import secrets

import numpy as np
import orjson
from fastapi import Request
from starlette.responses import Response

from service.errors import APIError, responses
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
    """The family's model (named like the family) at the requested or default version; 404 otherwise."""
    registry = get_registry(request)
    if not registry.ready:
        raise not_ready(registry)
    return registry.get(family, version, family=family)


def new_seed(seed: int | None) -> int:
    """The request's seed, or a fresh one that fits a JSON number exactly (< 2**53)."""
    return seed if seed is not None else secrets.randbits(53)


def label_array(labels: int | list[int] | None, n: int, default: int | np.ndarray) -> np.ndarray:
    """The request's labels as an (n,) int64 array; `default` when it gave none. An (n,) int64 `default` is
    returned itself, not a copy (12 us saved in a loaded handler), so pass a fresh array of draws."""
    if labels is None:
        default = np.asarray(default, np.int64)
        return default if default.shape == (n,) else np.broadcast_to(default, (n,)).copy()
    return np.full(n, labels, np.int64) if isinstance(labels, int) else np.asarray(labels, np.int64)


class JSON(Response):
    """orjson-encoded response: numpy-free payloads of plain lists, several times faster than json.dumps."""
    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content)


def reply(mv: ModelVersion, **payload) -> JSON:
    return JSON({"model": mv.name, "model_version": mv.version, **payload})
