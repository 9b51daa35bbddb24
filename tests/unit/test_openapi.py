"""docs/openapi.json is the app's current OpenAPI document, and a truthful one: every error status with the body
the service answers, Prometheus text for /metrics, exact integer bounds, and request schemas that refuse what
validation refuses. tests/api/test_schemathesis.py holds the document against a live server."""

from __future__ import annotations

import ast
import json
from functools import cache
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator

from service import errors
from service.app import create_app
from service.openapi import OPENAPI_FILE, REGENERATE, install, render
from service.settings import Settings

ZERO = [[0] * 28 for _ in range(28)]


@cache
def document() -> dict:
    return json.loads(render())


def operations():
    for path, methods in document()["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_committed_openapi_document_is_current():
    assert OPENAPI_FILE.exists(), f"{OPENAPI_FILE} is missing: run `{REGENERATE}`"
    current, committed = document(), json.loads(OPENAPI_FILE.read_text())
    stale = sorted(set(current["paths"]) ^ set(committed["paths"]))
    assert current == committed, (f"{OPENAPI_FILE.name} is stale (paths added or removed: {stale or 'none'}); "
                                  f"regenerate it with `{REGENERATE}`")


def test_installed_document_is_served():
    app = create_app(Settings())
    install(app)
    assert TestClient(app).get("/openapi.json").json() == document()  # no lifespan: nothing loads


def test_document_covers_the_v1_api():
    paths = document()["paths"]
    for path in ("/v1/gan/sample", "/v1/vae/encode", "/v1/pixelcnn/sample", "/v1/models", "/healthz", "/readyz"):
        assert path in paths


@pytest.mark.parametrize("path,method,statuses", [
    ("/v1/gan/sample", "post", {200, 400, 401, 404, 408, 413, 422, 500, 503, 504}),
    ("/v1/vae/attributes", "get", {200, 401, 404, 422, 500, 503}),
    ("/v1/models/{name}", "get", {200, 401, 404, 500, 503}),
    ("/readyz", "get", {200, 500, 503}),
    ("/v2/models/{name}/infer", "post", {200, 400, 401, 404, 408, 413, 500, 503, 504}),
    ("/v2/models/{name}", "get", {200, 401, 404, 500, 503}),
    ("/v2/health/ready", "get", {200, 500, 503}),
])
def test_routes_document_the_statuses_they_answer(path, method, statuses):
    assert set(map(int, document()["paths"][path][method]["responses"])) == statuses


def test_errors_are_documented_with_the_bodies_the_service_answers():
    for path, method, operation in operations():
        for status, response in operation["responses"].items():
            if status.startswith("2") or path == "/readyz":
                continue
            schema = response["content"]["application/json"]["schema"]
            body = "V2ErrorResponse" if path.startswith("/v2") else "ErrorResponse"
            assert schema == {"$ref": f"#/components/schemas/{body}"}, (path, method, status)
            if status == "503":
                assert "Retry-After" in response["headers"], (path, method)
    # FastAPI's own 422 body ({"detail": [...]}) is never answered here
    assert "HTTPValidationError" not in json.dumps(document())


def test_api_keys_are_documented_where_the_gate_asks_for_them():
    """The paths service.auth.protects: a 401 with WWW-Authenticate and the API keys' security, optional (the server
    may have no keys); the others (health, metrics, the protocol's server metadata) neither."""
    schemes = document()["components"]["securitySchemes"]
    assert schemes["apiKey"] == {**schemes["apiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["apiKeyBearer"]["scheme"] == schemes["adminToken"]["scheme"] == "bearer"
    guarded = 0
    for path, method, operation in operations():
        if operation.get("security") == [{"adminToken": []}]:   # the admin routes: the admin token instead
            continue
        if path.startswith(("/v1/", "/v2/")) and not path.startswith("/v2/health/"):
            guarded += 1
            assert operation["security"] == [{"apiKey": []}, {"apiKeyBearer": []}, {}], (path, method)
            assert operation["responses"]["401"]["headers"]["WWW-Authenticate"]["required"] is True
            assert "(code: unauthorized)" in operation["responses"]["401"]["description"] or path.startswith("/v2")
        else:
            assert "security" not in operation and "401" not in operation["responses"], (path, method)
    assert guarded >= 20


def test_admin_routes_are_documented_from_their_dependency():
    """The model control's routes depend on require_admin: they answer 401 and 403 and need the admin token, under
    /v1 and /v2 alike (the routes of included routers too)."""
    paths = document()["paths"]
    for path, method in (("/v1/models/{name}/traffic", "put"), ("/v2/repository/models/{model}/load", "post"),
                         ("/v2/repository/models/{model}/unload", "post")):
        operation = paths[path][method]
        assert operation["security"] == [{"adminToken": []}]
        body = "V2ErrorResponse" if path.startswith("/v2") else "ErrorResponse"
        for status in ("401", "403"):
            assert operation["responses"][status]["content"]["application/json"]["schema"] == {
                "$ref": f"#/components/schemas/{body}"}
        assert "GENSERVE_ADMIN_TOKEN" in operation["responses"]["403"]["description"]
    assert paths["/v1/models/{name}"]["get"]["security"][0] == {"apiKey": []}   # the other routes as before


def test_metrics_is_documented_as_prometheus_text():
    assert set(document()["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


def test_integer_bounds_are_integers_and_exact():
    text = render()
    assert '"maximum": 9223372036854775807' in text and "9.223372036854776e" not in text

    def floats_in_integer_schemas(node):
        if isinstance(node, dict):
            if node.get("type") == "integer":
                yield from (k for k, v in node.items() if isinstance(v, float))
            for value in node.values():
                yield from floats_in_integer_schemas(value)
        elif isinstance(node, list):
            for value in node:
                yield from floats_in_integer_schemas(value)

    assert list(floats_in_integer_schemas(document())) == []


def request_schema(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": document()["components"]})


# Each refused by validation (tests/api/test_errors.py), and now by the schema too
@pytest.mark.parametrize("schema,body", [
    ("GanSampleRequest", {"labels": []}),
    ("GanSampleRequest", {"labels": [1] * 257}),
    ("PixelCNNSampleRequest", {"labels": [1] * 65}),
    ("GanSampleRequest", {"seed": 2**63}),
    ("VaeEncodeRequest", {"images": [None]}),
    ("VaeEncodeRequest", {"images": [""]}),
    ("VaeEncodeRequest", {"images": [ZERO[:27]]}),
    ("VaeEncodeRequest", {"images": [[[256] * 28] * 28]}),
    ("VaeInterpolateRequest", {"start": None, "end": ZERO}),
    ("VaeDecodeRequest", {"latents": [[]]}),
    ("VaeEditRequest", {"images": [ZERO], "edits": {"": 1.0}}),
])
def test_request_schemas_refuse_what_validation_refuses(schema, body):
    assert not request_schema(schema).is_valid(body)


@pytest.mark.parametrize("schema,body", [
    ("GanSampleRequest", {"n": 2, "labels": [3, 8], "seed": 2**63 - 1}),
    ("VaeEncodeRequest", {"images": ["iVBORw0KGgo=", ZERO]}),
    ("VaeDecodeRequest", {"latents": [[0.0] * 16]}),
    ("VaeEditRequest", {"images": [ZERO], "edits": {"slant": -1.5}}),
])
def test_request_schemas_admit_valid_bodies(schema, body):
    assert request_schema(schema).is_valid(body)


# --- the error codes each status lists come from service/errors.py's table ---------------------------------------

def answered_statuses() -> set[int]:
    return {status for row in (*errors.ERRORS.values(), errors.UNEXPECTED) for status, _ in row.answers}


def test_every_status_the_error_table_answers_is_documented_with_its_codes():
    # 405 aside: FastAPI documents no wrong method, the router answers it for any path
    assert answered_statuses() - set(errors.STATUS_DOCS) == {405}
    for status in errors.STATUS_DOCS:
        assert errors.codes(status), status
    assert errors.codes(503) == ("not_ready", "shutting_down", "overloaded", "resource_exhausted")
    assert "invalid_tensor" not in errors.codes(400)  # raised only under /v2, whose bodies carry no code


_HELPERS = {"not_found": (404, "not_found")}  # of service/errors.py


def api_errors_raised_in(path: Path) -> set[tuple[int, str]]:
    """The (status, code) of every APIError the module builds, directly or through a helper of service.errors."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else (func.attr if isinstance(func, ast.Attribute) else None)
        if name == "APIError":
            args = [*node.args, *(k.value for k in node.keywords if k.arg in ("status", "code"))][:2]
            assert all(isinstance(a, ast.Constant) for a in args), f"{path}:{node.lineno}: status and code literal"
            found.add((args[0].value, args[1].value))
        elif name in _HELPERS and (isinstance(func, ast.Name) or getattr(func.value, "id", None) == "errors"):
            found.add(_HELPERS[name])
    return found


def test_route_answers_list_every_api_error_the_service_raises():
    package = Path(errors.__file__).parent
    raised = set().union(*(api_errors_raised_in(p) for p in package.rglob("*.py") if p != Path(errors.__file__)))
    assert raised | set(_HELPERS.values()) == set(errors.ROUTE_ANSWERS)  # a helper counts, used or not (yet)


def test_one_version_everywhere():
    """The package, the OpenAPI document and the app carry service.__version__ (pyproject.toml reads it from
    there; tests/api/test_v2.py checks /v2's server metadata, tests/deploy/test_k8s.py the image tags)."""
    import tomllib

    import service

    repo = Path(__file__).resolve().parents[2]
    project = tomllib.loads((repo / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "service.__version__"}
    assert document()["info"]["version"] == create_app(Settings()).version == service.__version__
