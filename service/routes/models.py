"""GET /v1/models and /v1/models/{name}: what is loaded, where it runs, how it batches, how good it is; PUT
/v1/models/{name}/traffic: how requests that name no version are split between its versions."""

from __future__ import annotations

import logging
import os
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request

from service.auth import require_admin
from service.errors import responses
from service.routes.common import ANY, JSON, LOOKUP, get_registry, not_ready
from service.schemas import TrafficResponse

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ANY)


@router.get("")
async def list_models(request: Request):
    """Every model serving, what was refused, and this process (`process`, the worker that answered): its memory
    (RSS now and at its peak, anonymous and file-backed), the time from its start to loading and to ready, and
    what each version cost to load and warm up."""
    reg = get_registry(request)
    return JSON({"models": [_summary(reg, name) for name in sorted(reg.models)],
                 "refused": [{"path": p, "problems": probs} for p, probs in reg.refused.items()],
                 "process": _process(reg)})


def _process(reg) -> dict:
    """The registry's memory report; only the pid where it fails: figures never fail the request."""
    try:
        return reg.memory_report()
    except Exception:
        log.warning("GET /v1/models: no memory report", exc_info=True)
        return {"pid": os.getpid()}


@router.get("/{name}", responses=LOOKUP)
async def get_model(name: str, request: Request):
    reg = get_registry(request)
    if not reg.ready and name not in reg.models:  # it may be one still loading: not a 404 yet
        raise not_ready(reg)
    reg.get(name)  # 404 for an unknown model
    return JSON(_summary(reg, name, detail=True))


Weights = Annotated[dict[str, Annotated[float, Body(ge=0)]], Body(
    examples=[{"1": 90, "2": 10}],
    description="version -> weight (any scale, >= 0) over loaded versions; {} removes the split")]


@router.put("/{name}/traffic", response_model=TrafficResponse, responses={**LOOKUP, **responses(400, 409, 422)},
            dependencies=[Depends(require_admin)])
async def set_traffic(name: str, weights: Weights, request: Request):
    """Split the requests to this model that name no version between its loaded versions, by weight: `{"1": 90,
    "2": 10}` sends a tenth to version 2, `{"2": 100}` promotes it. A request that names a version gets it. With
    several workers every worker takes the split: `workers` tells how many have."""
    repository = request.app.state.repository
    repository.check_control()
    result = await repository.set_traffic(name, weights)
    return JSON({"model": name, "traffic": result.traffic, "default_version": result.default_version,
                 "workers": result.workers.as_json()})


def _summary(reg, name: str, detail: bool = False) -> dict:
    versions = reg.models[name]
    default = max(versions)
    out = {"name": name, "family": versions[default].family, "default_version": default,
           "versions": sorted(versions), "traffic": {str(v): w for v, w in reg.snapshot.traffic.get(name, ())}}
    if detail:
        out["details"] = {str(v): mv.describe() for v, mv in sorted(versions.items())}
    else:
        d = versions[default].describe()
        out.update(provider=d["provider"], batching=d["batching"], metrics=d["metrics"], graphs=d["graphs"])
    return out
