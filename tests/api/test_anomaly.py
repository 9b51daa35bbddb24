"""POST /v1/pixelcnn/anomaly on the shipped store, in-process: the service reproduces each version's reference
scores, held-out digits it never calibrated on are rarely flagged and get roughly uniform p-values, simple and
foreign images are flagged, and bad requests are a 422 naming the field."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from scipy import stats

from service.app import create_app
from service.settings import Settings
from service.store import read_manifest, write_manifest
from tests.api.conftest import wait_ready
from tests.conftest import REPO
from training.anomaly import halves
from training.data import load_dataset, split

ANOMALY = "/v1/pixelcnn/anomaly"
STORE = REPO / "models_store"
SETTINGS = {"warmup": False, "intra_op_threads": 1, "worker_threads": 1}


@pytest.fixture(scope="module")
def shipped():
    with TestClient(create_app(Settings(store_path=STORE, **SETTINGS))) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def heldout_halves() -> tuple[np.ndarray, np.ndarray]:
    return halves(split(load_dataset())[1])


def scored(client, images: np.ndarray, **fields) -> dict:
    r = client.post(ANOMALY, json={"images": [im.tolist() for im in images], **fields})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("version", [1, 2])
def test_the_service_scores_the_reference_digits_as_the_export_did(shipped, heldout_halves, version):
    """Export and service compute the score the same way (same graph, same PNG complexity), so each version's
    p-values are read against scores measured like the ones they are compared with."""
    body = scored(shipped, heldout_halves[0], model_version=version)
    stored = read_manifest(STORE / "pixelcnn" / str(version)).anomaly
    assert body["reference_size"] == len(stored.scores) == len(heldout_halves[0])
    assert np.allclose(sorted(r["score"] for r in body["results"]), stored.scores, atol=1e-3)


def test_heldout_digits_are_rarely_flagged_and_their_p_values_are_roughly_uniform(shipped, heldout_halves):
    body = scored(shipped, heldout_halves[1])        # the half the reference never saw
    p = np.array([r["p_value"] for r in body["results"]])
    flagged = np.array([r["anomalous"] for r in body["results"]])
    p_likely = np.array([r["likelihood_p_value"] for r in body["results"]])
    assert body["alpha"] == 0.01 and np.array_equal(flagged, np.minimum(p, p_likely) < 0.005)
    assert flagged.mean() <= 0.05
    assert stats.kstest(p, "uniform").pvalue > 0.01
    assert np.histogram(p, bins=5, range=(0, 1))[0].min() >= 0.1 * len(p)   # every fifth of [0, 1] holds some


def test_an_all_black_image_is_flagged_where_raw_likelihood_calls_it_the_likeliest(shipped, heldout_halves):
    black = np.zeros((1, 28, 28), np.uint8)
    digits = scored(shipped, heldout_halves[1])["results"]
    result = scored(shipped, black)["results"][0]
    assert result["logprob"] > max(r["logprob"] for r in digits)       # raw log p(x) ranks it above every digit
    assert result["anomalous"] and result["likelihood_p_value"] == 1 / 251   # likelier than every reference digit
    assert result["p_value"] < 0.05                                    # and its score in the digits' upper tail
    assert result["complexity_bits"] < min(r["complexity_bits"] for r in digits)


def test_noise_inverted_and_gray_images_are_flagged(shipped, heldout_halves):
    rng = np.random.default_rng(0)
    foreign = np.concatenate([rng.integers(0, 256, (2, 28, 28), dtype=np.uint8), 255 - heldout_halves[1][:2],
                              np.full((2, 28, 28), 128, np.uint8), np.full((1, 28, 28), 255, np.uint8)])
    results = scored(shipped, foreign)["results"]
    assert all(r["anomalous"] for r in results), [r["p_value"] for r in results]
    assert all(r["p_value"] == 1 / 251 for r in results)               # above every reference score


def test_the_likelihood_parts_are_logprobs(shipped, heldout_halves):
    images = heldout_halves[1][:3]
    anomaly = scored(shipped, images)["results"]
    r = shipped.post("/v1/pixelcnn/logprob", json={"images": [im.tolist() for im in images]})
    for a, lp in zip(anomaly, r.json()["results"], strict=True):
        assert a["logprob"] == pytest.approx(lp["logprob"], abs=1e-3)
        assert a["bits_per_dim"] == pytest.approx(lp["bits_per_dim"], abs=1e-6)
        assert a["score"] == pytest.approx(-a["logprob"] / np.log(2) - a["complexity_bits"], abs=1e-6)


@pytest.mark.parametrize("change, field", [
    ({"alpha": 0}, "alpha"), ({"alpha": 1}, "alpha"), ({"alpha": "0.1"}, "alpha"), ({"alpha": 2 / 251}, "alpha"),
    ({"images": []}, "images"), ({"images": [[[0] * 28] * 27]}, "images[0]"), ({"model_version": 9}, "model_version"),
    ({"labels": 3}, "labels"),
])
def test_bad_requests_are_a_422_naming_the_field(shipped, heldout_halves, change, field):
    body = {"images": [heldout_halves[1][0].tolist()], **change}
    r = shipped.post(ANOMALY, json=body)
    if field == "model_version":                                       # no such version: not found
        assert r.status_code == 404 and "version 9" in r.json()["error"]["message"], r.text
        return
    assert r.status_code == 422, r.text
    assert field in [f["field"] for f in r.json()["error"]["fields"]], r.json()


def test_a_version_without_a_reference_is_a_422_naming_model_version(tmp_path, heldout_halves):
    shutil.copytree(STORE / "pixelcnn" / "2", tmp_path / "pixelcnn" / "2")
    manifest = read_manifest(tmp_path / "pixelcnn" / "2")
    write_manifest(manifest.model_copy(update={"anomaly": None}), tmp_path / "pixelcnn" / "2")
    with TestClient(create_app(Settings(store_path=tmp_path, **SETTINGS))) as c:
        wait_ready(c)
        r = c.post(ANOMALY, json={"images": [heldout_halves[1][0].tolist()]})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["fields"][0]["field"] == "model_version"
    assert "no anomaly reference" in r.json()["error"]["message"]
