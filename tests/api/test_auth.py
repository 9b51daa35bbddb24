"""API keys and the admin token on the app in-process (shipped store, no warm-up): which paths need a key, both
headers, the 401s and their bodies (the protocol's under /v2), the per-key counter, no key in the logs or the
metrics, and `require_admin` on a route mounted here (the admin routes' own tests use it the same way)."""

from __future__ import annotations

import hashlib
import logging

import pytest
from fastapi import Depends
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import require_admin
from service.settings import Settings
from tests.api.conftest import make_client, wait_ready
from tests.api.test_server_process import scrape
from tests.conftest import REPO

STORE = REPO / "models_store"
KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-fedcba9876543210"
ADMIN = "admin-token-0123456789abcdef"
SAMPLE = {"n": 1, "seed": 1, "format": "array"}
V2_INFER = {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64},
                       {"name": "label", "datatype": "INT64", "shape": [1], "data": [3]}]}
ADMIN_PATH = "/v1/test/admin"  # mounted here, under /v1 like the real admin routes
ADMIN_V2_PATH = "/v2/test/admin"


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


async def _admin_ok():
    return {"ok": True}


def with_admin_routes(client: TestClient) -> TestClient:
    for path in (ADMIN_PATH, ADMIN_V2_PATH):
        client.app.add_api_route(path, _admin_ok, methods=["POST"], dependencies=[Depends(require_admin)])
    return client


@pytest.fixture(scope="module")
def client():
    c = with_admin_routes(make_client(STORE, warmup=False, providers="cpu", api_keys=[KEY_A, KEY_B],
                                      admin_token=ADMIN))
    with c:
        wait_ready(c)
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_unauthorized(r, realm: str = "genserve", v2: bool = False) -> str:
    assert r.status_code == 401, r.text
    assert r.headers["WWW-Authenticate"] == f'Bearer realm="{realm}"'
    body = r.json()
    if v2:  # the Open Inference Protocol's error body
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        return body["error"]
    assert body["error"]["code"] == "unauthorized", body
    return body["error"]["message"]


def test_a_model_route_without_a_key_is_401_saying_how_to_send_one(client):
    message = assert_unauthorized(client.post("/v1/gan/sample", json=SAMPLE))
    assert "Authorization: Bearer" in message and "X-API-Key" in message


@pytest.mark.parametrize("headers", [bearer("key-a-0123456789abcdeX"), {"X-API-Key": "nope"},
                                     {"Authorization": f"Basic {KEY_A}"}, bearer("")],
                         ids=["wrong bearer", "wrong x-api-key", "basic scheme", "empty bearer"])
def test_a_wrong_key_is_401(client, headers):
    message = assert_unauthorized(client.post("/v1/gan/sample", json=SAMPLE, headers=headers))
    assert KEY_A not in message


@pytest.mark.parametrize("headers", [bearer(KEY_A), {"authorization": f"bearer {KEY_B}"}, {"X-API-Key": KEY_A},
                                     {"x-api-key": KEY_B, "Authorization": "Basic Zm9vOmJhcg=="}],
                         ids=["bearer", "bearer, lower case", "x-api-key", "x-api-key beside basic"])
def test_a_right_key_in_either_header_is_served(client, headers):
    r = client.post("/v1/gan/sample", json=SAMPLE, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "gan" and len(r.json()["images"]) == 1


def test_the_key_is_checked_before_the_body_is_read(client):
    """No key: 401, not the 400 of a malformed body or the 422 of a wrong field (nothing about the API leaks)."""
    malformed = {"content": b"{not json", "headers": {"content-type": "application/json"}}
    assert_unauthorized(client.post("/v1/gan/sample", **malformed))
    assert_unauthorized(client.post("/v1/gan/sample", json={"n": "three"}))
    assert client.post("/v1/gan/sample", json={"n": "three"}, headers=bearer(KEY_A)).status_code == 422


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/models"), ("GET", "/v1/models/gan"), ("GET", "/v1/vae/attributes"),
    ("POST", "/v1/pixelcnn/logprob"), ("GET", "/v1/no/such/route"),
    ("GET", "/v2/models/gan.generator"), ("GET", "/v2/models/gan.generator/ready"),
    ("GET", "/v2/models/gan.generator/versions/1/ready"), ("POST", "/v2/repository/index"),
])
def test_every_model_route_needs_a_key(client, method, path):
    assert_unauthorized(client.request(method, path), v2=path.startswith("/v2"))
    assert client.request(method, path, headers={"X-API-Key": KEY_B}).status_code != 401


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready",
                                  "/docs", "/openapi.json", "/playground", "/playground/playground.js",
                                  "/playground/digit"])
def test_health_metrics_docs_and_the_playground_stay_open(client, path):
    assert client.get(path).status_code == 200


def test_v2_infer_needs_a_key_and_answers_with_the_protocols_body(client):
    message = assert_unauthorized(client.post("/v2/models/gan.generator/infer", json=V2_INFER), v2=True)
    assert "API key" in message
    assert_unauthorized(client.post("/v2/models/gan.generator/infer", json=V2_INFER, headers=bearer("x" * 20)), v2=True)
    r = client.post("/v2/models/gan.generator/infer", json=V2_INFER, headers=bearer(KEY_B))
    assert r.status_code == 200, r.text
    assert r.json()["model_name"] == "gan.generator"


def test_requests_are_counted_per_key_id_never_per_key(client):
    before = client.get("/metrics").text
    for _ in range(3):
        assert client.post("/v1/gan/sample", json=SAMPLE, headers=bearer(KEY_A)).status_code == 200
    assert client.get("/v1/models", headers={"X-API-Key": KEY_B}).status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"X-API-Key": "wrong"}).status_code == 401
    after = client.get("/metrics").text
    counted = "genserve_api_key_requests_total"
    assert scrape(after, counted, key_id=key_id(KEY_A)) - scrape(before, counted, key_id=key_id(KEY_A)) == 3
    assert scrape(after, counted, key_id=key_id(KEY_B)) - scrape(before, counted, key_id=key_id(KEY_B)) == 1
    failed = "genserve_auth_failures_total"
    for reason in ("missing", "wrong"):
        labels = {"credential": "api_key", "reason": reason}
        assert scrape(after, failed, **labels) - scrape(before, failed, **labels) == 1
    assert KEY_A not in after and KEY_B not in after and ADMIN not in after


def test_the_admin_token_is_accepted_on_the_data_plane_counted_as_admin(client):
    before = client.get("/metrics").text
    assert client.post("/v1/gan/sample", json=SAMPLE, headers=bearer(ADMIN)).status_code == 200
    after = client.get("/metrics").text
    name = "genserve_api_key_requests_total"
    assert scrape(after, name, key_id="admin") - scrape(before, name, key_id="admin") == 1


def test_no_key_or_token_reaches_the_logs(caplog):
    caplog.set_level(logging.DEBUG)
    c = make_client(STORE, warmup=False, providers="cpu", api_keys=[KEY_A, KEY_B], admin_token=ADMIN)
    with with_admin_routes(c):
        wait_ready(c)
        c.post("/v1/gan/sample", json=SAMPLE, headers=bearer(KEY_A))
        c.post("/v1/gan/sample", json=SAMPLE, headers={"X-API-Key": KEY_B + "x"})
        c.post(ADMIN_PATH, headers=bearer(ADMIN))
        c.post(ADMIN_PATH, headers=bearer(ADMIN + "x"))
        c.post(ADMIN_PATH, headers=bearer(KEY_A))
    logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert key_id(KEY_A) in logged and key_id(KEY_B) in logged   # the start-up line names the keys by id
    for secret in (KEY_A, KEY_B, ADMIN):
        assert secret not in logged


# --- the admin dependency -----------------------------------------------------------------------------------------

def test_admin_route_with_the_admin_token(client):
    r = client.post(ADMIN_PATH, headers=bearer(ADMIN))
    assert r.status_code == 200 and r.json() == {"ok": True}


@pytest.mark.parametrize("headers", [bearer(KEY_A), {"X-API-Key": ADMIN}, {"X-API-Key": KEY_A}],
                         ids=["an API key", "the token in x-api-key", "an API key in x-api-key"])
def test_admin_route_refuses_anything_but_the_admin_token_as_bearer(client, headers):
    message = assert_unauthorized(client.post(ADMIN_PATH, headers=headers), realm="genserve admin")
    assert "admin token" in message


@pytest.mark.parametrize("headers", [{}, bearer(ADMIN + "x")], ids=["none", "wrong token"])
def test_admin_route_without_a_valid_credential_is_401(client, headers):
    # API keys on: the request gate answers first, with its realm (a wrong token is no valid credential at all)
    assert_unauthorized(client.post(ADMIN_PATH, headers=headers))


@pytest.fixture(scope="module")
def no_keys_client():
    """API keys off, the admin token set: only `require_admin` guards the admin routes. No lifespan: the admin
    route needs no model."""
    return with_admin_routes(TestClient(create_app(Settings(store_path=STORE, admin_token=ADMIN))))


def test_admin_route_without_keys_on(no_keys_client):
    message = assert_unauthorized(no_keys_client.post(ADMIN_PATH), realm="genserve admin")
    assert "Authorization: Bearer" in message
    assert_unauthorized(no_keys_client.post(ADMIN_PATH, headers=bearer("y" * 30)), realm="genserve admin")
    assert_unauthorized(no_keys_client.post(ADMIN_V2_PATH), realm="genserve admin", v2=True)
    assert no_keys_client.post(ADMIN_PATH, headers=bearer(ADMIN)).status_code == 200
    assert no_keys_client.post(ADMIN_V2_PATH, headers={"authorization": f"BEARER {ADMIN}"}).status_code == 200
    # and the data plane needs no key: routing answers (no lifespan here, so no model: a path that needs none)
    assert no_keys_client.get("/v1/no/such/route").status_code == 404


def test_admin_routes_are_403_until_an_admin_token_is_set():
    c = with_admin_routes(TestClient(create_app(Settings(store_path=STORE))))
    for headers in ({}, bearer(ADMIN)):
        r = c.post(ADMIN_PATH, headers=headers)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled", r.text
        assert "set GENSERVE_ADMIN_TOKEN" in r.json()["error"]["message"]
        assert "WWW-Authenticate" not in r.headers
    r = c.post(ADMIN_V2_PATH)
    assert r.status_code == 403 and "GENSERVE_ADMIN_TOKEN" in r.json()["error"]
