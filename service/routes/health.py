"""Liveness, readiness and the Prometheus endpoint (outside /v1: infrastructure, not API)."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.routes.common import JSON, get_registry

router = APIRouter(tags=["health"])
# HEAD, which some load balancers probe with, on routes of their own (one route with both methods gives OpenAPI
# a duplicate operation id). Included after every other router: FastAPI matches routes one by one, and two
# more routes up front cost every request ~7 us in-process.
head_router = APIRouter(tags=["health"], include_in_schema=False)


@router.get("/healthz")
async def healthz():
    """The process is alive and its event loop answers."""
    return JSON({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request):
    """200 once every valid model is loaded and warmed up; 503 before (and while draining at shutdown)."""
    reg = get_registry(request)
    body = {"ready": reg.ready, "models": {n: sorted(v) for n, v in reg.models.items()},
            "refused": sorted(reg.refused), "pid": os.getpid()}  # readiness is per worker: which one answered
    return JSON(body, status_code=200 if reg.ready else 503)


@router.get("/metrics")
async def metrics(request: Request):
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


head_router.add_api_route("/healthz", healthz, methods=["HEAD"])
head_router.add_api_route("/readyz", readyz, methods=["HEAD"])
