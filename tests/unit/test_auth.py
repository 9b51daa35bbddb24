"""The credentials without a server: GENSERVE_API_KEYS and GENSERVE_ADMIN_TOKEN read and checked at start-up (a
JSON list or a key file, errors that never show a secret), key ids, which paths need a key, the constant-time
comparison, `require_admin`'s 403/401/pass, and the error table's rows."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.requests import Request

from service import auth, errors
from service.auth import AdminDisabled, AdminUnauthorized, Auth, Unauthorized, key_id, protects, require_admin
from service.metrics import Metrics
from service.settings import SECRET_MIN_CHARS, Settings

KEY_A = "a" * 8 + "-0123456789"
KEY_B = "b" * 8 + "-9876543210"
ADMIN = "t0ken-for-the-admin-routes"


@pytest.fixture(autouse=True)
def no_genserve_environment(monkeypatch):
    """Settings read the environment: only what a test sets counts."""
    import os

    for name in [n for n in os.environ if n.startswith("GENSERVE_")]:
        monkeypatch.delenv(name)


def keys_of(settings: Settings) -> list[str]:
    return [k.get_secret_value() for k in settings.api_keys]


# --- reading the settings -----------------------------------------------------------------------------------------

def test_api_keys_file_one_key_a_line_without_comments_or_blank_lines(tmp_path, monkeypatch):
    path = tmp_path / "api-keys"
    path.write_text(f"# keys of the web team\n\n  {KEY_A}  \n\t\n# {KEY_B} retired\n{KEY_B}\n{KEY_A}\n")
    monkeypatch.setenv("GENSERVE_API_KEYS", str(path))
    assert keys_of(Settings()) == [KEY_A, KEY_B]   # stripped, comments out, the duplicate once


def test_api_keys_as_a_json_list(monkeypatch):
    monkeypatch.setenv("GENSERVE_API_KEYS", f'["{KEY_A}", "{KEY_B}"]')
    assert keys_of(Settings()) == [KEY_A, KEY_B]
    assert keys_of(Settings(api_keys=[KEY_B])) == [KEY_B]   # as tests and callers pass them


def test_unset_means_off():
    assert Settings().api_keys is None and Settings().admin_token is None


@pytest.mark.parametrize("value", ["[]", "", "   "], ids=["empty list", "empty", "blank"])
def test_no_key_at_all_is_refused_not_taken_for_off(monkeypatch, value):
    monkeypatch.setenv("GENSERVE_API_KEYS", value)
    with pytest.raises(ValidationError, match="unset it to serve without API keys"):
        Settings()


def test_a_key_file_with_only_comments_is_refused(tmp_path, monkeypatch):
    (path := tmp_path / "keys").write_text("# nothing yet\n\n")
    monkeypatch.setenv("GENSERVE_API_KEYS", str(path))
    with pytest.raises(ValidationError, match="holds no key"):
        Settings()


@pytest.mark.parametrize("content,fragment", [
    (f"{KEY_A}\nshort\n", "line 2 of"),
    (f"{KEY_A}\nhas a space-0123456789\n", "line 2 of"),
    (f"{KEY_A}\nnon-ascii-\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\n", "printable ASCII"),
])
def test_a_bad_line_in_the_key_file_is_named_without_showing_the_key(tmp_path, monkeypatch, content, fragment):
    (path := tmp_path / "keys").write_text(content)
    monkeypatch.setenv("GENSERVE_API_KEYS", str(path))
    with pytest.raises(ValidationError, match=fragment) as caught:
        Settings()
    assert KEY_A not in str(caught.value) and content.splitlines()[1] not in str(caught.value)


def test_a_missing_or_unreadable_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("GENSERVE_API_KEYS", str(tmp_path / "absent"))
    with pytest.raises(ValidationError, match="neither a JSON list nor a readable file.*absent.*No such file"):
        Settings()
    (binary := tmp_path / "binary").write_bytes(b"\xff\xfe" + KEY_A.encode())
    monkeypatch.setenv("GENSERVE_API_KEYS", str(binary))
    with pytest.raises(ValidationError, match="not UTF-8"):
        Settings()


@pytest.mark.parametrize("value,fragment", [
    (f'["{KEY_A}", ', "not a JSON list"), (f'["{KEY_A}", 7]', "list of strings"),
    (f'["{KEY_A}", "short"]', "key 1 has 5 characters"), (f'["{KEY_A}", ""]', "key 1 is empty"),
])
def test_a_bad_json_list_is_refused_without_showing_the_keys(monkeypatch, value, fragment):
    monkeypatch.setenv("GENSERVE_API_KEYS", value)
    with pytest.raises(ValidationError, match=fragment) as caught:
        Settings()
    assert KEY_A not in str(caught.value)


@pytest.mark.parametrize("token,fragment", [
    (ADMIN + "\n", "trailing newline"), ("short-token", f"fewer than {SECRET_MIN_CHARS}"), ("", "is empty"),
    ("an admin token with spaces", "without spaces"),
])
def test_a_bad_admin_token_is_refused_without_showing_it(monkeypatch, token, fragment):
    monkeypatch.setenv("GENSERVE_ADMIN_TOKEN", token)
    with pytest.raises(ValidationError, match=fragment) as caught:
        Settings()
    assert not token.strip() or token.strip() not in str(caught.value)


def test_the_admin_token_may_not_be_an_api_key():
    with pytest.raises(ValidationError, match="also one of GENSERVE_API_KEYS") as caught:
        Settings(api_keys=[KEY_A, ADMIN], admin_token=ADMIN)
    assert ADMIN not in str(caught.value)


def test_settings_never_show_their_secrets():
    s = Settings(api_keys=[KEY_A], admin_token=ADMIN)
    for shown in (repr(s), str(s), s.model_dump_json()):
        assert KEY_A not in shown and ADMIN not in shown


# --- key ids and paths --------------------------------------------------------------------------------------------

def test_a_key_id_is_a_digest_prefix_not_the_key():
    assert key_id(KEY_A) == hashlib.sha256(KEY_A.encode()).hexdigest()[:8]
    assert len(key_id(KEY_A)) == 8 and int(key_id(KEY_A), 16) >= 0
    assert key_id(KEY_A) not in KEY_A and key_id(KEY_A) != key_id(KEY_B)


@pytest.mark.parametrize("path,guarded", [
    ("/v1/gan/sample", True), ("/v1/models", True), ("/v1/models/{name}", True), ("/v1/no/such/route", True),
    ("/v2/models/gan.generator/infer", True), ("/v2/repository/index", True), ("/v2/models/{name}/ready", True),
    ("/v2/repository/models/gan/load", True),
    ("/v2", False), ("/v2/health/live", False), ("/v2/health/ready", False), ("/healthz", False),
    ("/readyz", False), ("/metrics", False), ("/docs", False), ("/openapi.json", False), ("/playground", False),
    ("/playground/api.js", False), ("/v1x/gan", False), ("/v2x/models", False),
])
def test_which_paths_need_a_key(path, guarded):
    assert protects(path) is guarded


# --- the checks ---------------------------------------------------------------------------------------------------

def scope(path: str = "/v1/gan/sample", **headers: str) -> dict:
    return {"type": "http", "path": path, "root_path": "",
            "headers": [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]}


def test_the_comparison_is_constant_time_and_visits_every_key(monkeypatch):
    calls = []

    def spy(a, b):
        calls.append((a, b))
        return a == b

    checker = Auth(Settings(api_keys=[KEY_A, KEY_B, "c" * 20], admin_token=ADMIN), Metrics())
    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    checker.check(scope(x_api_key=KEY_A))                # the first key: the loop still goes through the others
    assert len(calls) == 4                               # three keys and the admin token, none skipped
    assert all(isinstance(a, bytes) and isinstance(b, bytes) and len(a) == len(b) == 32 for a, b in calls)
    assert all(KEY_A.encode() not in (a, b) for a, b in calls)   # digests, never the key itself


def test_check_passes_counts_and_refuses():
    metrics = Metrics()
    checker = Auth(Settings(api_keys=[KEY_A, KEY_B], admin_token=ADMIN), metrics)
    checker.check(scope(authorization=f"Bearer {KEY_B}"))
    checker.check(scope(authorization=f"bearer   {KEY_B} "))
    checker.check(scope(x_api_key=ADMIN))
    checker.check(scope("/healthz"))                     # open: no key, nothing counted
    with pytest.raises(Unauthorized, match="API key is required") as missing:
        checker.check(scope())
    assert type(missing.value) is Unauthorized
    with pytest.raises(Unauthorized, match="not valid"):
        checker.check(scope(authorization=f"Bearer {KEY_B}x"))
    counted = metrics.api_key_requests_total
    assert counted.labels(key_id(KEY_B))._value.get() == 2 and counted.labels("admin")._value.get() == 1
    failures = metrics.auth_failures_total
    assert failures.labels("api_key", "missing")._value.get() == 1
    assert failures.labels("api_key", "wrong")._value.get() == 1


def test_without_keys_every_path_is_open():
    checker = Auth(Settings(admin_token=ADMIN), Metrics())
    assert not checker.keys_on
    checker.check(scope())


def run_require_admin(settings: Settings, **headers: str) -> None:
    app = FastAPI()
    app.state.auth = Auth(settings, Metrics())
    asyncio.run(require_admin(Request({**scope("/v2/repository/models/gan/load", **headers), "app": app})))


def test_require_admin_is_403_without_an_admin_token():
    with pytest.raises(AdminDisabled, match="set GENSERVE_ADMIN_TOKEN"):
        run_require_admin(Settings(), authorization=f"Bearer {ADMIN}")


@pytest.mark.parametrize("headers,fragment", [
    ({}, "needs the admin token"), ({"authorization": f"Bearer {ADMIN}x"}, "not valid"),
    ({"authorization": f"Basic {ADMIN}"}, "needs the admin token"), ({"x_api_key": ADMIN}, "needs the admin token"),
    ({"authorization": f"Bearer {KEY_A}"}, "not valid"),
])
def test_require_admin_is_401_without_the_token_as_bearer(headers, fragment):
    with pytest.raises(AdminUnauthorized, match=fragment):
        run_require_admin(Settings(admin_token=ADMIN, api_keys=[KEY_A]), **headers)


def test_require_admin_passes_the_token():
    run_require_admin(Settings(admin_token=ADMIN), authorization=f"Bearer {ADMIN}")
    run_require_admin(Settings(admin_token=ADMIN), authorization=f"BEARER {ADMIN}")


# --- the error table ----------------------------------------------------------------------------------------------

def test_the_error_table_answers_401_with_the_realm_and_403():
    data, admin, off = (errors.reply(e) for e in (Unauthorized("no key"), AdminUnauthorized("no token"),
                                                    AdminDisabled("off")))
    assert (data.status, data.code, data.headers) == (401, "unauthorized", {"WWW-Authenticate": auth.API_REALM})
    assert (admin.status, admin.headers) == (401, {"WWW-Authenticate": 'Bearer realm="genserve admin"'})
    assert (off.status, off.code, off.headers) == (403, "admin_disabled", None)
    status, body = errors.status_and_body(Unauthorized("no key"), v2=True)
    assert (status, body) == (401, {"error": "no key"})
