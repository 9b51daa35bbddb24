"""Who may call what: the API keys of the data plane and the admin token of the admin routes. The settings read
and check both at start-up (service/settings.py); this module checks requests against them.

API keys (GENSERVE_API_KEYS) are optional. While they are set, every request under /v1 and /v2 needs one, sent
as `Authorization: Bearer <key>` or `X-API-Key: <key>`, except the Open Inference Protocol's server metadata
(`GET /v2`) and health (`/v2/health/...`), which only say the server is there. Everything outside /v1 and /v2
stays open: /healthz, /readyz and /metrics, since a kubelet probe or a Prometheus scraper carries no secret (a
liveness probe that cannot pass would have the pod restarted) and they answer no model output; /docs,
/openapi.json and the playground's files. No key, or a wrong one: 401 with WWW-Authenticate.

The key check runs in the request gate (service.middleware), not as a FastAPI dependency of the routers: the
gate runs before the body is read and before admission, so a request without a key costs no body read, no
JSON parsing and no in-flight slot, and cannot learn the API's validation errors (FastAPI resolves dependencies
after parsing the body). It guards by path, so a route added under /v1 or /v2 later is covered without being
told, and a request to an unknown path there is answered 401, not 404.

The admin token (GENSERVE_ADMIN_TOKEN) guards the admin routes, which declare the dependency `require_admin`.
Unset: they answer 403, saying how to turn them on; a missing or wrong `Authorization: Bearer` token: 401.
The admin token is also accepted where an API key is: whoever holds it can change the models, so reading them
grants nothing more, and the admin routes, which live under /v1 and /v2, pass the key check with the one token
their caller holds. An API key never opens an admin route.

A presented credential's SHA-256 is compared with every key's with hmac.compare_digest, without stopping at a
match: the time taken says neither how much of a key matched nor which key it was. Metrics and logs name a key
by its id, the first 8 hex digits of its SHA-256 (`key_id`): with keys of 16 characters or more (the settings
refuse shorter ones) the id cannot be turned back into the key. Nothing here logs a credential.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable

from fastapi import Request
from starlette.types import Scope

from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

KEY_ID_CHARS = 8
ADMIN_KEY_ID = "admin"  # the admin token's key id in the metrics
API_REALM = 'Bearer realm="genserve"'
ADMIN_REALM = 'Bearer realm="genserve admin"'


class Unauthorized(Exception):
    """401 under /v1 and /v2 while API keys are on: no valid key."""


class AdminUnauthorized(Unauthorized):
    """401 on an admin route: no valid admin token."""


class AdminDisabled(Exception):
    """403 on an admin route: the server has no admin token."""


def key_id(key: str) -> str:
    """What metrics and logs call a key: the start of its SHA-256, in hex."""
    return hashlib.sha256(key.encode()).hexdigest()[:KEY_ID_CHARS]


def protects(path: str) -> bool:
    """Whether API keys guard `path`, a request's path or a route's template."""
    if path.startswith("/v1/"):
        return True
    return path.startswith("/v2/") and not path.startswith("/v2/health/")


def _route_path(scope: Scope) -> str:
    """The path that routing matches: without the root path, as Starlette strips it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


def _bearer(value: bytes) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` value (the scheme in any case), else None."""
    scheme, _, token = value.strip().partition(b" ")
    return (token.strip() or None) if scheme.lower() == b"bearer" else None


def _credentials(headers: Iterable[tuple[bytes, bytes]], api_key_header: bool = True) -> list[bytes]:
    """Every credential a request presents: bearer tokens, and X-API-Key values unless `api_key_header` is False."""
    found = []
    for name, value in headers:
        if name == b"authorization":
            token = _bearer(value)
        elif name == b"x-api-key" and api_key_header:
            token = value.strip() or None
        else:
            continue
        if token is not None:
            found.append(token)
    return found


def _digest(secret: str | bytes) -> bytes:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).digest()


def _match(presented: list[bytes], table: tuple[tuple[bytes, str], ...]) -> str | None:
    """The id of the key that one of `presented` is, or None; constant-time in what the keys hold."""
    found = None
    for credential in presented:
        digest = _digest(credential)
        for key_digest, kid in table:
            if hmac.compare_digest(digest, key_digest):
                found = kid
    return found


class Auth:
    """The credentials of one app, from its settings: `check` for the request gate, `check_admin` for
    `require_admin`. Refusals are counted in the metrics (genserve_auth_failures_total), passes by key id
    (genserve_api_key_requests_total)."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.metrics = metrics
        token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
        self._admin = ((_digest(token), ADMIN_KEY_ID),) if token is not None else ()
        keys = [k.get_secret_value() for k in settings.api_keys or ()]
        self.key_ids = tuple(key_id(k) for k in keys)
        self.keys_on = bool(keys)
        self._keys = tuple((_digest(k), kid) for k, kid in zip(keys, self.key_ids, strict=True)) + self._admin
        if self.keys_on:
            log.info("API keys on: /v1 and /v2 need one of %d keys (ids %s)", len(keys), ", ".join(self.key_ids))
        else:
            log.info("API keys off: /v1 and /v2 need no key (set GENSERVE_API_KEYS to require one)")
        if not self._admin:
            log.info("admin routes off (403): set GENSERVE_ADMIN_TOKEN to turn them on")

    def check(self, scope: Scope) -> None:
        """Let the request through, or raise Unauthorized: while API keys are on, on the paths they guard."""
        if not self.keys_on or not protects(_route_path(scope)):
            return
        presented = _credentials(scope["headers"])
        found = _match(presented, self._keys)
        if found is None:
            self.metrics.on_auth_failure("api_key", "wrong" if presented else "missing")
            raise Unauthorized("the API key is not valid" if presented else
                               "an API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
        self.metrics.on_api_key(found)

    def check_admin(self, scope: Scope) -> None:
        """Let an admin request through, or raise AdminDisabled (no admin token set) or AdminUnauthorized."""
        if not self._admin:
            self.metrics.on_auth_failure("admin_token", "disabled")
            raise AdminDisabled("the admin routes are off: set GENSERVE_ADMIN_TOKEN on the server to turn them on")
        presented = _credentials(scope["headers"], api_key_header=False)
        if _match(presented, self._admin) is None:
            self.metrics.on_auth_failure("admin_token", "wrong" if presented else "missing")
            raise AdminUnauthorized("the admin token is not valid" if presented else
                                    "this route needs the admin token: send `Authorization: Bearer <token>`")


async def require_admin(request: Request) -> None:
    """The dependency of every admin route: `dependencies=[Depends(require_admin)]`. Async: FastAPI would run a
    plain function in a worker thread."""
    request.app.state.auth.check_admin(request.scope)


# The OpenAPI document's names for the credentials (service.openapi adds them to the operations they guard)
SECURITY_SCHEMES = {
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
               "description": "one of GENSERVE_API_KEYS, needed under /v1 and /v2 while they are set"},
    "apiKeyBearer": {"type": "http", "scheme": "bearer",
                     "description": "one of GENSERVE_API_KEYS as a bearer token, the same as X-API-Key"},
    "adminToken": {"type": "http", "scheme": "bearer",
                   "description": "GENSERVE_ADMIN_TOKEN; also accepted where an API key is"},
}
# Either header, or none while the server has no API keys ({}: OpenAPI's "no credential")
API_KEY_SECURITY: list[dict] = [{"apiKey": []}, {"apiKeyBearer": []}, {}]
ADMIN_SECURITY: list[dict] = [{"adminToken": []}]
