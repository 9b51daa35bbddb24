"""The anomaly score's parts: the PNG complexity (every candidate a valid PNG of the image), the score and its
conformal p-value, the manifest's reference contract, the AUROC, and the sets the evaluation builds."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from sklearn.metrics import roc_auc_score

from service.families import pixelcnn
from service.families.shared import InvalidField
from service.imaging import _PNG_FILTERS, _pngs, png_bits
from service.store import AnomalyReference, Manifest, read_manifest
from tests.conftest import REPO
from training.anomaly import BAND, SHIFT, outlier_sets
from training.data import load_dataset, split
from training.evalutils import auroc


def reference(scores, nll_bits=None) -> AnomalyReference:
    nll = sorted(nll_bits if nll_bits is not None else np.linspace(300.0, 1500.0, len(scores)))
    return AnomalyReference(complexity="png-min-filter-zlib9", source="test", scores=sorted(scores), nll_bits=nll)


@pytest.fixture(scope="module")
def images(digits) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([digits[2].images[:6], rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
                           np.zeros((1, 28, 28), np.uint8), np.full((1, 28, 28), 255, np.uint8)])


@pytest.mark.parametrize("kind", range(len(_PNG_FILTERS)))
def test_every_filter_writes_a_png_that_decodes_to_the_image(images, kind):
    for image, png in zip(images, _pngs(images, kind, 9), strict=True):
        with Image.open(io.BytesIO(png)) as im:
            assert im.mode == "L" and im.size == (28, 28)
            assert np.array_equal(np.asarray(im), image)


def test_complexity_is_the_smallest_png_in_bits(images):
    bits = png_bits(images)
    assert bits.dtype == np.int64
    digits, noise, black = bits[:6], bits[6:8], bits[8]
    assert black < digits.min() and digits.max() < noise.min()
    ramp = np.tile(np.arange(0, 252, 9, dtype=np.uint8), (28, 1))[None]   # each row 0, 9, 18, ...: "sub" is constant
    assert png_bits(ramp)[0] == 8 * len(_pngs(ramp, 1, 9)[0]) < 8 * len(_pngs(ramp, 0, 9)[0])


def test_complexity_is_what_the_shipped_references_were_measured_with(digits):
    """Golden lengths: a zlib that deflates differently (zlib-ng, another level-9 strategy) would shift every score
    away from the manifests' references, measured with zlib 1.2.13."""
    pattern = (np.arange(784) % 256).astype(np.uint8).reshape(1, 28, 28)
    assert png_bits(np.zeros((1, 28, 28), np.uint8)).tolist() == [584]
    assert png_bits(pattern).tolist() == [672]
    assert png_bits(split(load_dataset())[1].images[:3]).tolist() == [2120, 2016, 2584]


def test_complexity_refuses_what_is_not_a_uint8_batch():
    with pytest.raises(ValueError, match="uint8"):
        png_bits(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        png_bits(np.zeros((28, 28), np.uint8))


def test_the_score_is_model_bits_minus_png_bits():
    logprob = np.array([-100 * math.log(2), -300 * math.log(2)])   # 100 and 300 bits
    assert np.allclose(pixelcnn.anomaly_scores(logprob, np.array([400, 250])), [-300.0, 50.0])


def test_p_values_count_the_reference_at_least_as_high_and_the_image_itself():
    p = pixelcnn.p_values(np.array([0.0, 1.0, 2.0, 2.5, 3.0, 9.0]), [1.0, 2.0, 2.0, 3.0])
    assert np.allclose(p, [5 / 5, 5 / 5, 4 / 5, 2 / 5, 2 / 5, 1 / 5])  # ties count as "at least as high"


def test_p_values_of_draws_like_the_reference_are_uniform():
    """Over references and images drawn alike, the p-value is uniform on 1/(N+1), ..., 1: P(p <= alpha) = alpha
    at each of those levels."""
    rng = np.random.default_rng(1)
    trials, n = 20000, 19
    p = np.array([pixelcnn.p_values(rng.normal(size=1), np.sort(rng.normal(size=n)))[0] for _ in range(trials)])
    levels, counts = np.unique(np.rint(p * (n + 1)), return_counts=True)
    assert levels.tolist() == list(range(1, n + 2))
    assert np.abs(counts / trials - 1 / (n + 1)).max() < 0.01          # each level ~0.05, std ~0.0015


def test_either_tail_at_half_alpha_flags_an_image():
    ref = reference(np.arange(200.0).tolist(), np.linspace(300.0, 1500.0, 200).tolist())
    nats = np.log(2)
    out = {"log_probs": np.stack([np.full((28, 28), -800 / 784 * nats),      # 800 bits: a typical digit
                                  np.full((28, 28), -800 / 784 * nats),      # the same, with little complexity
                                  np.full((28, 28), -20 / 784 * nats)])      # 20 bits: likelier than any digit
           .astype(np.float32)}
    results = pixelcnn.anomaly_results(out, np.array([800 - 100, 800 - 300, 120]), ref, alpha=0.02)
    assert [r["anomalous"] for r in results] == [False, True, True]
    assert results[1]["p_value"] == pytest.approx(1 / 201) and results[1]["likelihood_p_value"] > 0.1
    assert results[2]["likelihood_p_value"] == pytest.approx(1 / 201) and results[2]["p_value"] > 0.5
    assert set(results[0]) == {"score", "logprob", "bits_per_dim", "complexity_bits", "p_value",
                               "likelihood_p_value", "anomalous"}
    assert not any(r["anomalous"] for r in pixelcnn.anomaly_results(out, np.array([700, 500, 120]), ref, 0.009))


def test_an_alpha_no_p_value_can_pass_under_is_refused():
    ref = reference(np.arange(200.0).tolist())
    with pytest.raises(InvalidField) as e:
        pixelcnn.check_alpha(ref, 2 / 201)
    assert e.value.field == "alpha" and "2/201" in e.value.message
    pixelcnn.check_alpha(ref, 2 / 201 + 1e-9)


@pytest.mark.parametrize("scores, nll, match", [
    ([float(i) for i in range(199)], [float(i) for i in range(199)], "at least 200"),
    ([float(i) for i in range(200)][::-1], [float(i) for i in range(200)], "ascending"),
    ([float(i) for i in range(200)], [float(i) for i in range(199)] + [math.nan], "finite"),
    ([float(i) for i in range(200)], [float(i) for i in range(201)], "same digits"),
])
def test_a_bad_reference_is_refused(scores, nll, match):
    with pytest.raises(ValidationError, match=match):
        AnomalyReference(complexity="png-min-filter-zlib9", source="test", scores=scores, nll_bits=nll)


def test_a_reference_measured_another_way_is_refused():
    with pytest.raises(ValidationError, match="complexity"):
        AnomalyReference(complexity="webp", source="test", scores=[float(i) for i in range(200)],
                         nll_bits=[float(i) for i in range(200)])


def test_a_manifest_with_a_reference_declares_schema_2():
    manifest = read_manifest(REPO / "models_store" / "pixelcnn" / "2")
    assert manifest.schema_version == 2 and manifest.anomaly is not None
    with pytest.raises(ValidationError, match="schema_version 2"):
        Manifest.model_validate({**manifest.model_dump(), "schema_version": 1})
    assert Manifest.model_validate({**manifest.model_dump(), "anomaly": None}).schema_version == 2


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 5, 40), rng.integers(2, 8, 30)
    y = np.r_[np.zeros(40), np.ones(30)]
    assert auroc(a, b) == pytest.approx(roc_auc_score(y, np.r_[a, b]))
    assert auroc([0, 1], [2, 3]) == 1.0 and auroc([2, 3], [0, 1]) == 0.0 and auroc([1, 1], [1]) == 0.5
    with pytest.raises(ValueError):
        auroc([], [1.0])


def test_outlier_sets_are_what_they_say(digits):
    source = digits[2].images[:20]
    sets = outlier_sets(source)
    assert all(s.dtype == np.uint8 and s.shape[1:] == (28, 28) for s in sets.values())
    constant = sets["constant images, every gray level"]
    assert sorted(np.unique(constant.reshape(256, -1), axis=1).ravel()) == list(range(256))
    assert np.array_equal(sets["inverted digits"], 255 - source)
    shifted = sets[f"digits shifted {SHIFT} pixels"]
    assert np.array_equal(shifted[0, SHIFT:], source[0, :-SHIFT]) and not shifted[0, :SHIFT].any()  # moved down
    assert np.array_equal(shifted[3, :, :-SHIFT], source[3, :, SHIFT:])                              # moved left
    erased = sets[f"digits with rows {BAND[0]}-{BAND[1] - 1} erased"]
    assert not erased[:, BAND[0]:BAND[1]].any() and np.array_equal(erased[:, :BAND[0]], source[:, :BAND[0]])
    small = sets["scikit-learn 8x8 digits, upscaled"]
    assert len(small) == 20 and not small[:, :4].any() and small.max() > 200
