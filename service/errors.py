"""The one place where exceptions become HTTP status codes.

Error bodies: {"error": {"code": "...", "message": "...", "fields": [{"field": "images[2]", "message": "..."}]}}
Internal details never leave the process: anything unexpected is logged and answered 500 "internal error".
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from service.batcher import BatcherClosed, DeadlineExceeded, QueueFull
from service.imaging import ImageDecodeError
from service.runtime import ModelNotFound

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the API reports as is: status, machine-readable code, message, and optionally the field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


def not_found(message: str) -> APIError:
    return APIError(404, "not_found", message)


def invalid(field: str, message: str) -> APIError:
    return APIError(422, "invalid_request", message, field=field)


def _body(code: str, message: str, fields: list[dict] | None = None) -> dict:
    err: dict = {"code": code, "message": message}
    if fields:
        err["fields"] = fields
    return {"error": err}


# pydantic names the branch of a union that failed ('constrained-int', 'list[constrained-int]'): not a field
_UNION_TAGS = {"int", "str", "float", "bool", "list", "dict", "none"}


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or "-" in part or part in _UNION_TAGS)


def _field_name(loc: tuple) -> str:
    """('body', 'images', 3) -> 'images[3]'; ('body', 'edits', 'thick') -> 'edits.thick';
    ('body', 'labels', 'list[constrained-int]', 2) -> 'labels[2]'."""
    parts = [p for p in loc if p != "body" and not _is_union_tag(p)]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def to_response(exc: Exception) -> JSONResponse:
    """Map any exception to its response. The whole status-code policy of the service is in this function."""
    if isinstance(exc, APIError):
        fields = [{"field": exc.field, "message": exc.message}] if exc.field else None
        return JSONResponse(_body(exc.code, exc.message if not exc.field else f"{exc.field}: {exc.message}",
                                  fields), exc.status, headers=exc.headers)
    if isinstance(exc, ModelNotFound):
        return JSONResponse(_body("not_found", str(exc)), 404)
    if isinstance(exc, ImageDecodeError):
        return JSONResponse(_body("invalid_image", str(exc), [{"field": exc.field, "message": exc.message}]), 422)
    if isinstance(exc, RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(_body("malformed_json", "request body is not valid JSON",
                                      [{"field": "body", "message": str(errors[0].get("msg", ""))}]), 400)
        fields = []
        for e in errors:
            f = {"field": _field_name(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")}
            if f not in fields:
                fields.append(f)
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
        return JSONResponse(_body("invalid_request", summary, fields), 422)
    if isinstance(exc, QueueFull):
        return JSONResponse(_body("overloaded", "server is at capacity, retry later"), 503,
                            headers={"Retry-After": "1"})
    if isinstance(exc, BatcherClosed):
        return JSONResponse(_body("shutting_down", "server is shutting down"), 503, headers={"Retry-After": "1"})
    if isinstance(exc, DeadlineExceeded):
        return JSONResponse(_body("timeout", "request waited past its deadline and was dropped"), 504)
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "error")
        return JSONResponse(_body(code, str(exc.detail)), exc.status_code, headers=getattr(exc, "headers", None))
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(_body("internal", "internal error"), 500)


def install(app: FastAPI) -> None:
    async def handler(_: Request, exc: Exception) -> JSONResponse:
        return to_response(exc)

    for exc_type in (APIError, ModelNotFound, ImageDecodeError, RequestValidationError, QueueFull, BatcherClosed,
                     DeadlineExceeded, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handler)
