"""The one place where exceptions become HTTP status codes.

Error bodies: {"error": {"code": "...", "message": "...", "fields": [{"field": "images[2]", "message": "..."}]}},
except under /v2 (the Open Inference Protocol), where the protocol's own {"error": "message"} is used with the
same status codes.
Internal details never leave the process: anything unexpected is logged and answered 500 "internal error".

The policy is one table, ERRORS: exception class -> how it is answered. An exception is looked up along its class
hierarchy, most specific class first, so a subclass answers like its parent unless it has a row of its own. The
handlers FastAPI calls are registered from the same table, and the codes the OpenAPI document lists under each
status are read from it: adding a row is the only step.
"""

from __future__ import annotations

import functools
import logging
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from service import schemas
from service.auth import ADMIN_REALM, API_REALM, AdminDisabled, AdminUnauthorized, Unauthorized
from service.batcher import BatcherClosed, DeadlineExceeded, QueueFull
from service.families.shared import InvalidField
from service.imaging import ImageDecodeError
from service.repository import InvalidTraffic, LoadRefused, ModelControlRefused
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


# --- the policy --------------------------------------------------------------------------------------------------

class Reply(NamedTuple):
    """What an exception is answered with, under /v1 and /v2 alike (/v2 shows only status, message and headers)."""
    status: int
    code: str
    message: str
    fields: list[dict] | None = None
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class Rule:
    """A fixed status, code and headers; the message is fixed text or made from the exception (str by default),
    and `fields` names the request fields to blame, if any. `in_v1` is False for an exception raised only under
    /v2, whose bodies carry no code: its code is then left out of the documentation."""
    status: int
    code: str
    message: str | Callable[[Any], str] = str
    headers: dict[str, str] | None = None
    fields: Callable[[Any], list[dict]] | None = None
    in_v1: bool = True

    @property
    def answers(self) -> tuple[tuple[int, str], ...]:
        return ((self.status, self.code),) if self.in_v1 else ()

    def reply(self, exc: Any) -> Reply:
        message = self.message if isinstance(self.message, str) else self.message(exc)
        return Reply(self.status, self.code, message, self.fields(exc) if self.fields else None, self.headers)


@dataclass(frozen=True)
class Computed:
    """An answer that needs logic: `reply` makes it from the exception; `answers` lists every (status, code) it
    gives under /v1 that the OpenAPI document states."""
    reply: Callable[[Any], Reply]
    answers: tuple[tuple[int, str], ...]


def _api_error(exc: APIError) -> Reply:
    fields = [{"field": exc.field, "message": exc.message}] if exc.field else None
    message = f"{exc.field}: {exc.message}" if exc.field else exc.message
    return Reply(exc.status, exc.code, message, fields, exc.headers)


# The codes the routes raise APIError with (not_found(), routes.common.not_ready() and /v2's readiness); a field
# the model cannot take is the families' InvalidField. tests/api/test_errors.py reads the routes to keep this true.
ROUTE_ANSWERS = ((404, "not_found"), (503, "not_ready"), (503, "shutting_down"))

_BODY_PARSE_FAILED = "There was an error parsing the body"  # FastAPI's detail when json.loads raised


def _malformed_json(detail: str) -> Reply:
    return Reply(400, "malformed_json", "request body is not valid JSON", [{"field": "body", "message": detail}])


@functools.cache
def union_fields() -> frozenset[str]:
    """The /v1 request fields typed as a union (None aside). In a validation error's location pydantic puts the
    failing branch's tag ('constrained-int', 'list[constrained-int]') right after such a field's name. Read at
    the first validation error, when every request body class exists."""
    names, bodies = set(), [schemas.RequestBody]
    while bodies:  # top-level fields only: no request nests a union deeper (yet)
        body = bodies.pop()
        bodies += body.__subclasses__()
        for name, info in body.model_fields.items():
            branches = [a for a in typing.get_args(info.annotation) if a is not type(None)]
            if typing.get_origin(info.annotation) in (typing.Union, types.UnionType) and len(branches) > 1:
                names.add(name)
    return frozenset(names)


def _field_name(loc: tuple) -> str:
    """('body', 'images', 3) -> 'images[3]'; ('body', 'edits', 'thick-ness') -> 'edits.thick-ness';
    ('body', 'labels', 'list[constrained-int]', 2) -> 'labels[2]'. Only a union's tag is dropped, by its
    position: a key the client wrote ('foo-bar', 'int') is named as written."""
    parts = loc[1:] if loc[:1] == ("body",) else loc
    unions = union_fields()
    out = ""
    for i, p in enumerate(parts):
        if i and isinstance(p, str) and parts[i - 1] in unions:
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _validation_error(exc: RequestValidationError) -> Reply:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return _malformed_json(str(errors[0].get("msg", "")))
    fields = []
    for e in errors:
        f = {"field": _field_name(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")}
        if f not in fields:
            fields.append(f)
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    return Reply(422, "invalid_request", summary, fields)


# Starlette's own statuses (unknown path, wrong method, the body limits of service.middleware): their codes
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "payload_too_large"}


def _http_error(exc: StarletteHTTPException) -> Reply:
    if exc.status_code == 400 and exc.detail == _BODY_PARSE_FAILED:  # bad UTF-8, nesting too deep...
        return _malformed_json(str(exc.detail))
    code = _HTTP_CODES.get(exc.status_code, "error")
    fields = [{"field": "body", "message": str(exc.detail)}] if exc.status_code in (408, 413) else None
    message = f"body: {exc.detail}" if fields else str(exc.detail)
    return Reply(exc.status_code, code, message, fields, getattr(exc, "headers", None))


RETRY_SOON = {"Retry-After": "1"}  # shared by the rows below; never modified

# The whole status-code policy of the service. Order does not matter: lookup follows the exception's MRO.
ERRORS: dict[type[Exception], Rule | Computed] = {
    APIError: Computed(_api_error, ROUTE_ANSWERS),
    ModelNotFound: Rule(404, "not_found"),
    InvalidField: Rule(422, "invalid_request", fields=lambda e: [{"field": e.field, "message": e.message}]),
    ImageDecodeError: Rule(422, "invalid_image", fields=lambda e: [{"field": e.field, "message": e.message}]),
    TensorError: Rule(400, "invalid_tensor", in_v1=False),
    RequestValidationError: Computed(_validation_error, ((400, "malformed_json"), (422, "invalid_request"))),
    QueueFull: Rule(503, "overloaded", "server is at capacity, retry later", RETRY_SOON),
    BatcherClosed: Rule(503, "shutting_down", "server is shutting down", RETRY_SOON),
    DeadlineExceeded: Rule(504, "timeout", "request waited past its deadline and was dropped"),
    ResourceExhausted: Rule(503, "resource_exhausted", "the model ran out of device memory, retry later", RETRY_SOON),
    ModelControlRefused: Rule(409, "model_control"),
    LoadRefused: Rule(400, "load_refused", fields=lambda e: [{"field": path, "message": "; ".join(problems)}
                                                           for path, problems in sorted(e.refused.items())]),
    InvalidTraffic: Rule(422, "invalid_request", fields=lambda e: [{"field": e.field, "message": e.message}]),
    StarletteHTTPException: Computed(_http_error, ((400, "malformed_json"), *_HTTP_CODES.items())),
    Unauthorized: Rule(401, "unauthorized", headers={"WWW-Authenticate": API_REALM}),
    AdminUnauthorized: Rule(401, "unauthorized", headers={"WWW-Authenticate": ADMIN_REALM}),
    AdminDisabled: Rule(403, "admin_disabled"),
}
UNEXPECTED = Rule(500, "internal", "internal error")  # anything else: a bug, logged with its traceback


def rule_for(exc_type: type[BaseException]) -> Rule | Computed | None:
    """The row of the most specific class in exc_type's hierarchy that has one, or None."""
    for cls in exc_type.__mro__:
        if (row := ERRORS.get(cls)) is not None:
            return row
    return None


def reply(exc: Exception) -> Reply:
    """How any exception is answered."""
    if (row := rule_for(type(exc))) is None:
        log.exception("unhandled error", exc_info=exc)
        row = UNEXPECTED
    return row.reply(exc)


# --- the documentation -------------------------------------------------------------------------------------------

# What each status means, as the OpenAPI document states it; the codes listed with it come from ERRORS.
STATUS_DOCS: dict[int, str] = {
    400: "The body is not valid JSON; under /v2 also a request that does not fit the model, or a load that "
         "refused versions (`fields` names each path and its problems; what served keeps serving)",
    401: "No valid credential: an API key (while GENSERVE_API_KEYS is set), or the admin token on an admin route; "
         "WWW-Authenticate names the realm",
    403: "The admin routes are off: the server has no GENSERVE_ADMIN_TOKEN",
    404: "Unknown model or model version",
    408: "The body did not arrive in time; the connection is closed",
    409: "This service takes no model changes through the API (GENSERVE_MODEL_CONTROL=none, or several workers)",
    413: "The body is larger than the server accepts",
    422: "A request field is invalid; `fields` names each one",
    500: "An unexpected failure, logged by the server and never detailed here",
    503: "Not now: models still loading, shutting down, the queue full or device memory exhausted; retry after "
         "Retry-After seconds",
    504: "The request waited past its deadline and was dropped",
}


def codes(status: int) -> tuple[str, ...]:
    """The /v1 codes answered with `status`, in table order (UNEXPECTED last)."""
    answers = [a for row in (*ERRORS.values(), UNEXPECTED) for a in row.answers]
    return tuple(dict.fromkeys(code for s, code in answers if s == status))


def responses(*statuses: int, v2: bool = False, always_retry_after: bool = True) -> dict[int | str, dict]:
    """FastAPI `responses=` documenting error statuses with their body: the /v1 one, or with v2 the Open
    Inference Protocol's. A 503 says Retry-After (see ERRORS and routes.common.not_ready), always unless the
    route also answers 503 where waiting does not help."""
    out: dict[int | str, dict] = {}
    for status in statuses:
        what = STATUS_DOCS[status]
        doc = {"model": V2ErrorResponse if v2 else ErrorResponse,
               "description": what if v2 else f"{what} (code: {', '.join(codes(status))})"}
        if status == 401:
            doc["headers"] = {"WWW-Authenticate": {"description": f"{API_REALM}, or {ADMIN_REALM} on an admin route",
                                                   "required": True, "schema": {"type": "string"}}}
        if status == 503:
            doc["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                              "required": always_retry_after,
                                              "schema": {"type": "integer", "minimum": 0}}}
        out[status] = doc
    return out


def is_v2_path(path: str) -> bool:
    """Paths of the Open Inference Protocol, whose errors use its own body: {"error": "message"}."""
    return path == "/v2" or path.startswith("/v2/")


def _error_body(answer: Reply, v2: bool) -> dict:
    return {"error": answer.message} if v2 else _body(answer.code, answer.message, answer.fields)


def status_and_body(exc: Exception, v2: bool = False) -> tuple[int, dict]:
    """The status and body `exc` is answered with, without a response: for an answer that can no longer be a
    status line, such as an error inside an event stream already under way."""
    answer = reply(exc)
    return answer.status, _error_body(answer, v2)


def to_response(exc: Exception, v2: bool = False) -> JSONResponse:
    """Map any exception to its response: the /v1 body, or with v2 the Open Inference Protocol's
    {"error": "message"}; status and headers are the same either way."""
    answer = reply(exc)
    return JSONResponse(_error_body(answer, v2), answer.status, headers=answer.headers)


def install(app: FastAPI) -> None:
    """Answer every exception class of ERRORS (and its subclasses) through to_response."""
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return to_response(exc, v2=is_v2_path(request.url.path))

    # Not Exception: Starlette answers that one in ServerErrorMiddleware and then re-raises, which closes the
    # connection. The request gate (service.middleware) answers the unexpected ones instead.
    for exc_type in ERRORS:
        app.add_exception_handler(exc_type, handler)
