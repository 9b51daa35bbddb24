"""The OpenAPI document of the app, as committed in docs/openapi.json.

    python -m service.openapi            # print it
    python -m service.openapi --write    # regenerate docs/openapi.json (tests/unit/test_openapi.py checks it)

Built from create_app() without starting it: no model is loaded, and settings do not change the document.

FastAPI's document needs two corrections, made by `document` (which `install` serves as the app's
/openapi.json):

* FastAPI passes the component schemas through its OpenAPI models, which type every numeric bound as a float:
  `le=256` comes out as 256.0, and the int64 limit 2**63-1 as 9.223372036854776e18, which is 2**63, a seed the
  service refuses. Integer schemas get integer bounds back.
* FastAPI documents a 422 with its own body ({"detail": [...]}) on every route with parameters that documents
  no 422 itself. This service never answers that body (service/errors.py answers validation errors with its own,
  and the routes document those), and a route whose only parameters are path strings cannot fail validation.

And it adds what FastAPI cannot see, the credentials (service.auth): the request gate checks API keys by path,
outside any route, so every operation on a path that `auth.protects` gets the 401 and the API keys' security
(optional: the server may have none), and every route depending on `auth.require_admin` the 401, the 403 and
the admin token's. Made from the same rule and dependency that the checks use, the document cannot drift from
them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import fastapi.routing
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from service import auth, errors
from service.settings import Settings

OPENAPI_FILE = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"
REGENERATE = "python -m service.openapi --write"
_FORMAT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_FASTAPI_422 = "HTTPValidationError"
_FASTAPI_422_PARTS = (_FASTAPI_422, "ValidationError")  # its body, and the item schema of its list


def _integer_bounds(node: Any) -> None:
    """In place: the bounds of every integer schema as integers. A float is exact up to 2**53; past that only a
    format bounds the value exactly, and a bound beyond the format's range (float 2**63 for 2**63-1) is its edge."""
    if isinstance(node, list):
        for item in node:
            _integer_bounds(item)
        return
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if kind == "integer" or (isinstance(kind, list) and "integer" in kind):
        lo, hi = _FORMAT_RANGES.get(node.get("format"), (-math.inf, math.inf))
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
            value = node.get(key)
            if isinstance(value, float) and value.is_integer():
                node[key] = int(value)
        for key in ("minimum", "maximum"):
            if isinstance(node.get(key), int):
                node[key] = int(min(max(node[key], lo), hi))
    for value in node.values():
        _integer_bounds(value)


def _drop_fastapi_422(spec: dict) -> None:
    """In place: FastAPI's own 422 responses, and their schemas once nothing refers to them."""
    ref = f"#/components/schemas/{_FASTAPI_422}"
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            answers = operation.get("responses", {})
            schema = answers.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if schema.get("$ref") == ref:
                del answers["422"]
    schemas = spec.get("components", {}).get("schemas", {})
    if f'"{ref}"' not in json.dumps(spec):
        for name in _FASTAPI_422_PARTS:
            schemas.pop(name, None)


def _error_response(status: int, v2: bool) -> dict:
    """errors.responses' documentation of `status` in the document's own form."""
    doc = errors.responses(status, v2=v2)[status]
    out = {"description": doc["description"], **({"headers": doc["headers"]} if "headers" in doc else {})}
    return {**out, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/"
                                                                       f"{doc['model'].__name__}"}}}}


def _needs_admin(dependant: Dependant) -> bool:
    return any(d.call is auth.require_admin or _needs_admin(d) for d in dependant.dependencies)


def _api_routes(app: FastAPI) -> list[tuple[str, APIRoute]]:
    """(path as served, route) of every API route, those of included routers too: recent FastAPI keeps an
    included router whole in app.routes and walks it through iter_route_contexts."""
    walk = getattr(fastapi.routing, "iter_route_contexts", None)
    if walk is None:
        return [(r.path_format, r) for r in app.routes if isinstance(r, APIRoute)]
    return [(c.path_format, c.original_route) for c in walk(app.routes) if isinstance(c.original_route, APIRoute)]


def _document_auth(app: FastAPI, spec: dict) -> None:
    """In place: the credentials each operation needs, and the statuses they answer (see the module's doc)."""
    admin = {(path, m.lower()) for path, route in _api_routes(app) if _needs_admin(route.dependant)
             for m in route.methods}
    for path, operations in spec.get("paths", {}).items():
        v2 = errors.is_v2_path(path)
        for method, operation in operations.items():
            if (path, method) in admin:
                operation["security"] = auth.ADMIN_SECURITY
                operation["responses"].update({"401": _error_response(401, v2), "403": _error_response(403, v2)})
            elif auth.protects(path):
                operation["security"] = auth.API_KEY_SECURITY
                operation["responses"]["401"] = _error_response(401, v2)
    spec.setdefault("components", {})["securitySchemes"] = auth.SECURITY_SCHEMES


def document(app: FastAPI) -> dict:
    """The app's OpenAPI document: FastAPI's (cached in app.openapi_schema), corrected in place. Idempotent."""
    spec = type(app).openapi(app)  # the class's builder: app.openapi itself may be this function
    _integer_bounds(spec)
    _drop_fastapi_422(spec)
    _document_auth(app, spec)
    return spec


def install(app: FastAPI) -> None:
    """Serve `document` as the app's /openapi.json (and to /docs). create_app calls it."""
    app.openapi = lambda: document(app)


def render() -> str:
    """Stable text: the document as the app serves it, indented, one trailing newline (diff-friendly)."""
    from service.app import create_app  # here, not at the top: service.app imports this module

    return json.dumps(create_app(Settings()).openapi(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service.openapi", description=__doc__.splitlines()[0])
    parser.add_argument("--write", nargs="?", const=OPENAPI_FILE, type=Path, metavar="PATH",
                        help=f"write to PATH (default {OPENAPI_FILE.relative_to(OPENAPI_FILE.parents[1])}) "
                             "instead of printing")
    args = parser.parse_args(argv)
    text = render()
    if args.write is None:
        sys.stdout.write(text)
    else:
        args.write.write_text(text)
        print(f"wrote {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
