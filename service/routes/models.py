"""GET /v1/models and /v1/models/{name}: what is loaded, where it runs, how it batches, how good it is."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.routes.common import ANY, JSON, LOOKUP, get_registry, not_ready

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ANY)


@router.get("")
async def list_models(request: Request):
    reg = get_registry(request)
    return JSON({"models": [_summary(reg, name) for name in sorted(reg.models)],
                 "refused": [{"path": p, "problems": probs} for p, probs in reg.refused.items()]})


@router.get("/{name}", responses=LOOKUP)
async def get_model(name: str, request: Request):
    reg = get_registry(request)
    if not reg.ready and name not in reg.models:  # it may be one still loading: not a 404 yet
        raise not_ready(reg)
    reg.get(name)  # 404 for an unknown model
    return JSON(_summary(reg, name, detail=True))


def _summary(reg, name: str, detail: bool = False) -> dict:
    versions = reg.models[name]
    default = max(versions)
    out = {"name": name, "family": versions[default].family, "default_version": default,
           "versions": sorted(versions)}
    if detail:
        out["details"] = {str(v): mv.describe() for v, mv in sorted(versions.items())}
    else:
        d = versions[default].describe()
        out.update(provider=d["provider"], batching=d["batching"], metrics=d["metrics"], graphs=d["graphs"])
    return out
