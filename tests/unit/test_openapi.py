"""docs/openapi.json is the app's current OpenAPI document."""

from __future__ import annotations

import json

from service.openapi import OPENAPI_FILE, REGENERATE, render


def test_committed_openapi_document_is_current():
    assert OPENAPI_FILE.exists(), f"{OPENAPI_FILE} is missing: run `{REGENERATE}`"
    current, committed = json.loads(render()), json.loads(OPENAPI_FILE.read_text())
    stale = sorted(set(current["paths"]) ^ set(committed["paths"]))
    assert current == committed, (f"{OPENAPI_FILE.name} is stale (paths added or removed: {stale or 'none'}); "
                                  f"regenerate it with `{REGENERATE}`")


def test_document_covers_the_v1_api():
    paths = json.loads(render())["paths"]
    for path in ("/v1/gan/sample", "/v1/vae/encode", "/v1/pixelcnn/sample", "/v1/models", "/healthz", "/readyz"):
        assert path in paths
