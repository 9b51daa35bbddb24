"""The shipped models_store/: every version validates, and the held-out floors of the training issue hold."""

from __future__ import annotations

import pytest

from service.store import load_store, read_manifest
from tests.conftest import REPO

STORE = REPO / "models_store"


@pytest.fixture(scope="module")
def manifests():
    return {name: read_manifest(STORE / name / "1") for name in ("pixelcnn", "vae", "gan")}


def test_shipped_store_validates():
    models, refused = load_store(STORE)
    assert refused == {} and sorted(models) == ["gan", "pixelcnn", "vae"]
    size = sum(p.stat().st_size for p in STORE.rglob("*") if p.is_file())
    assert size < 12e6, f"the store should stay a few MB, it is {size / 1e6:.1f} MB"


def test_pixelcnn_beats_the_floor_and_the_codecs(manifests):
    m = manifests["pixelcnn"].metrics
    assert m["heldout_bits_per_dim"] <= 1.15
    assert m["heldout_bits_per_dim"] < m["codec_bits_per_dim"]["webp_lossless"] < m["codec_bits_per_dim"]["png"]


def test_vae_bounds_and_edits(manifests):
    m = manifests["vae"].metrics
    assert m["iwae_samples"] >= 1000
    assert m["heldout_iwae_bits_per_dim"] <= m["heldout_neg_elbo_bits_per_dim"]
    for name in ("thickness", "slant"):
        assert m["attribute_edits"]["attributes"][name]["spearman_mean_per_image"] >= 0.9, name


def test_gan_judged_by_an_accurate_classifier(manifests):
    m = manifests["gan"].metrics
    assert m["judge"]["classifier"]["heldout_accuracy"] >= 0.97
    assert m["conditional_accuracy"] >= 0.9
    assert sum(m["unconditional_class_histogram"]) == manifests["gan"].dataset["heldout"]
