"""The one place where exceptions become HTTP status codes.

Error bodies: {"error": {"code": "...", "message": "...", "fields": [{"field": "images[2]", "message": "..."}]}},
except under /v2 (the Open Inference Protocol), where the protocol's own {"error": "message"} is used with the
same status codes.
Internal details never leave the process: anything unexpected is logged and answered 500 "internal error".
"""

from __future__ import annotations

import logging
import types
import typing

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from service import schemas
from service.batcher import BatcherClosed, DeadlineExceeded, QueueFull
from service.imaging import ImageDecodeError
from service.runtime import ModelNotFound, ResourceExhausted
from service.v2_codec import TensorError

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


class FieldError(BaseModel):
    field: str = Field(description="the request field as the client wrote it: 'images[2]', 'edits.slant', "
                                   "'query.model_version', or 'body' for the body as a whole")
    message: str


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable; each status lists the codes it answers with")
    message: str
    # absent, never null, when no field is to blame (_body leaves it out)
    fields: list[FieldError] | SkipJsonSchema[None] = None


class ErrorResponse(BaseModel):
    """The error body of every path outside /v2."""
    error: ErrorDetail


class V2ErrorResponse(BaseModel):
    """The Open Inference Protocol's error body, under /v2."""
    error: str


# The statuses of _classify (and of the routes' own APIErrors) as the OpenAPI document states them: what
# happened, and the /v1 `code`s that say so.
_STATUS_DOCS: dict[int, tuple[str, tuple[str, ...]]] = {
    400: ("The body is not valid JSON; under /v2 also a request that does not fit the model", ("malformed_json",)),
    404: ("Unknown model or model version", ("not_found",)),
    408: ("The body did not arrive in time; the connection is closed", ("request_timeout",)),
    413: ("The body is larger than the server accepts", ("payload_too_large",)),
    422: ("A request field is invalid; `fields` names each one", ("invalid_request", "invalid_image")),
    500: ("An unexpected failure, logged by the server and never detailed here", ("internal",)),
    503: ("Not now: models still loading, shutting down, the queue full or device memory exhausted; retry after "
          "Retry-After seconds", ("not_ready", "shutting_down", "overloaded", "resource_exhausted")),
    504: ("The request waited past its deadline and was dropped", ("timeout",)),
}


def responses(*statuses: int, v2: bool = False, always_retry_after: bool = True) -> dict[int | str, dict]:
    """FastAPI `responses=` documenting error statuses with their body: the /v1 one, or with v2 the Open
    Inference Protocol's. A 503 says Retry-After (see _classify and routes.common.not_ready), always unless the
    route also answers 503 where waiting does not help."""
    out: dict[int | str, dict] = {}
    for status in statuses:
        what, codes = _STATUS_DOCS[status]
        doc = {"model": V2ErrorResponse if v2 else ErrorResponse,
               "description": what if v2 else f"{what} (code: {', '.join(codes)})"}
        if status == 503:
            doc["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                              "required": always_retry_after,
                                              "schema": {"type": "integer", "minimum": 0}}}
        out[status] = doc
    return out


def _union_fields() -> frozenset[str]:
    """The /v1 request fields typed as a union (None aside). In a validation error's location pydantic puts the
    failing branch's tag ('constrained-int', 'list[constrained-int]') right after such a field's name."""
    names = set()
    for model in vars(schemas).values():  # top-level fields only: no request nests a union deeper (yet)
        if isinstance(model, type) and issubclass(model, schemas._Request):
            for name, info in model.model_fields.items():
                branches = [a for a in typing.get_args(info.annotation) if a is not type(None)]
                if typing.get_origin(info.annotation) in (typing.Union, types.UnionType) and len(branches) > 1:
                    names.add(name)
    return frozenset(names)


_UNION_FIELDS = _union_fields()
_BODY_PARSE_FAILED = "There was an error parsing the body"  # FastAPI's detail when json.loads raised


def _field_name(loc: tuple) -> str:
    """('body', 'images', 3) -> 'images[3]'; ('body', 'edits', 'thick-ness') -> 'edits.thick-ness';
    ('body', 'labels', 'list[constrained-int]', 2) -> 'labels[2]'. Only a union's tag is dropped, by its
    position: a key the client wrote ('foo-bar', 'int') is named as written."""
    parts = loc[1:] if loc[:1] == ("body",) else loc
    out = ""
    for i, p in enumerate(parts):
        if i and isinstance(p, str) and parts[i - 1] in _UNION_FIELDS:
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _classify(exc: Exception) -> tuple[int, str, str, list[dict] | None, dict[str, str] | None]:
    """(status, code, message, fields, headers) of any exception: the whole status-code policy of the service."""
    if isinstance(exc, APIError):
        fields = [{"field": exc.field, "message": exc.message}] if exc.field else None
        message = f"{exc.field}: {exc.message}" if exc.field else exc.message
        return exc.status, exc.code, message, fields, exc.headers
    if isinstance(exc, ModelNotFound):
        return 404, "not_found", str(exc), None, None
    if isinstance(exc, ImageDecodeError):
        return 422, "invalid_image", str(exc), [{"field": exc.field, "message": exc.message}], None
    if isinstance(exc, TensorError):
        return 400, "invalid_tensor", str(exc), None, None
    if isinstance(exc, RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            fields = [{"field": "body", "message": str(errors[0].get("msg", ""))}]
            return 400, "malformed_json", "request body is not valid JSON", fields, None
        fields = []
        for e in errors:
            f = {"field": _field_name(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")}
            if f not in fields:
                fields.append(f)
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
        return 422, "invalid_request", summary, fields, None
    if isinstance(exc, QueueFull):
        return 503, "overloaded", "server is at capacity, retry later", None, {"Retry-After": "1"}
    if isinstance(exc, BatcherClosed):
        return 503, "shutting_down", "server is shutting down", None, {"Retry-After": "1"}
    if isinstance(exc, DeadlineExceeded):
        return 504, "timeout", "request waited past its deadline and was dropped", None, None
    if isinstance(exc, ResourceExhausted):
        return 503, "resource_exhausted", "the model ran out of device memory, retry later", None, {"Retry-After": "1"}
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 400 and exc.detail == _BODY_PARSE_FAILED:  # bad UTF-8, nesting too deep...
            return 400, "malformed_json", "request body is not valid JSON", [
                {"field": "body", "message": str(exc.detail)}], None
        code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                413: "payload_too_large"}.get(exc.status_code, "error")
        fields = [{"field": "body", "message": str(exc.detail)}] if exc.status_code in (408, 413) else None
        message = f"body: {exc.detail}" if fields else str(exc.detail)
        return exc.status_code, code, message, fields, getattr(exc, "headers", None)
    log.exception("unhandled error", exc_info=exc)
    return 500, "internal", "internal error", None, None


def is_v2_path(path: str) -> bool:
    """Paths of the Open Inference Protocol, whose errors use its own body: {"error": "message"}."""
    return path == "/v2" or path.startswith("/v2/")


def to_response(exc: Exception, v2: bool = False) -> JSONResponse:
    """Map any exception to its response: the /v1 body, or with v2 the Open Inference Protocol's
    {"error": "message"}; status and headers are the same either way."""
    status, code, message, fields, headers = _classify(exc)
    return JSONResponse({"error": message} if v2 else _body(code, message, fields), status, headers=headers)


def install(app: FastAPI) -> None:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return to_response(exc, v2=is_v2_path(request.url.path))

    # Not Exception: Starlette answers that one in ServerErrorMiddleware and then re-raises, which closes the
    # connection. The request gate (service.middleware) answers the unexpected ones instead.
    for exc_type in (APIError, ModelNotFound, ResourceExhausted, ImageDecodeError, TensorError, RequestValidationError,
                     QueueFull, BatcherClosed, DeadlineExceeded, StarletteHTTPException):
        app.add_exception_handler(exc_type, handler)
