"""Liveness, readiness and the Prometheus endpoint (outside /v1: infrastructure, not API)."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.routes.common import ANY, JSON, get_registry
from service.schemas import Readiness

router = APIRouter(tags=["health"], responses=ANY)
# HEAD, which some load balancers probe with, on routes of their own (one route with both methods gives OpenAPI
# a duplicate operation id). Included after every other router: FastAPI matches routes one by one, so every
# route up front costs every request that matches later (docs/benchmarks.md, routers ordered data plane first).
head_router = APIRouter(tags=["health"], include_in_schema=False)


@router.get("/healthz")
async def healthz():
    """The process is alive and its event loop answers."""
    return JSON({"status": "ok"})


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "Not ready: models still loading, shutting down, or "
                                                                "a required model with no version serving"}})
async def readyz(request: Request):
    """200 once every valid model is loaded and warmed up and every required model (GENSERVE_REQUIRED_MODELS,
    by default every model folder in the store) has a version serving; 503 before, while draining at shutdown,
    and while a required model has none: `missing` names it, with each refused path and its problems."""
    reg = get_registry(request)
    ready = reg.fully_ready
    body = {"ready": ready, "models": {n: sorted(v) for n, v in reg.models.items()},
            "refused": sorted(reg.refused), "missing": dict(reg.missing),
            "pid": os.getpid()}  # readiness is per worker: which one answered
    return JSON(body, status_code=200 if ready else 503)


# Prometheus text, not JSON. A response class without a media type, so that the 200 is documented only as below and
# the errors keep their JSON bodies; the handler sets the exact content type, with the format's version.
@router.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus text exposition format: https://prometheus.io/docs/instrumenting/exposition_formats/",
    "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request):
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


head_router.add_api_route("/healthz", healthz, methods=["HEAD"])
head_router.add_api_route("/readyz", readyz, methods=["HEAD"])
