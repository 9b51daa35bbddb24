"""GET /playground: a page that shows what each model does, served from the package (service/playground/), with a
Content-Security-Policy that lets it load and call nothing but this service. Not API: outside /v1 and the OpenAPI
document, and switched off with GENSERVE_PLAYGROUND=false."""

from __future__ import annotations

import functools
import secrets
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Query
from starlette.responses import Response

from service.errors import not_found
from service.routes.common import JSON

ASSETS = Path(__file__).resolve().parents[1] / "playground"
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}
# The page is the service's own: scripts, styles and requests to this origin only; images also from data: URIs
# (the API answers PNG as base64).
_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                       "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                                       "form-action 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter(tags=["playground"], include_in_schema=False)


@functools.cache
def _assets() -> dict[str, tuple[bytes, str]]:
    """Name -> (bytes, media type) of every page file shipped in service/playground/, read once. A request names
    one of these or nothing: no path is ever built from it."""
    return {p.name: (p.read_bytes(), _MEDIA_TYPES[p.suffix]) for p in ASSETS.iterdir()
            if p.suffix in _MEDIA_TYPES and not p.name.startswith(".") and p.is_file()}


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 held-out digits and their (N,) labels, shipped for the page's "random digit" button."""
    with np.load(ASSETS / "heldout_digits.npz") as f:
        return f["images"], f["labels"]


@router.get("/playground")
async def page():
    return _served("index.html")


@router.get("/playground/digit")
async def digit(index: int | None = Query(None, ge=0)):
    """A held-out digit (one the models never trained on): the one at `index`, or one at random."""
    images, labels = _digits()
    if index is None:
        index = secrets.randbelow(len(images))
    elif index >= len(images):
        raise not_found(f"index {index}: there are {len(images)} digits (0..{len(images) - 1})")
    return JSON({"index": index, "label": int(labels[index]), "pixels": images[index].tolist()})


@router.get("/playground/{name}")
async def asset(name: str):
    return _served(name)


def _served(name: str) -> Response:
    found = _assets().get(name)
    if found is None:
        raise not_found(f"no playground file {name!r}")
    body, media = found
    return Response(body, media_type=media, headers=_HEADERS)
