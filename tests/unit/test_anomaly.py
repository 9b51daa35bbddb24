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
from service.store import AnomalyReference
from training.anomaly import BAND, SHIFT, outlier_sets
from training.evalutils import auroc


def reference(scores) -> AnomalyReference:
    return AnomalyReference(complexity="png-min-filter-zlib9", source="test", scores=sorted(scores))


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
    sizes = np.array([[len(p) for p in _pngs(images, k, 9)] for k in range(len(_PNG_FILTERS))])
    bits = png_bits(images)
    assert bits.dtype == np.int64 and np.array_equal(bits, 8 * sizes.min(axis=0))
    digits, noise, black = bits[:6], bits[6:8], bits[8]
    assert black < digits.min() and digits.max() < noise.min()
    ramp = np.tile(np.arange(0, 252, 9, dtype=np.uint8), (28, 1))[None]   # each row 0, 9, 18, ...: "sub" is constant
    assert png_bits(ramp)[0] == 8 * len(_pngs(ramp, 1, 9)[0]) < 8 * len(_pngs(ramp, 0, 9)[0])


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


def test_results_flag_p_values_below_alpha():
    ref = reference(np.arange(100.0).tolist())
    out = {"log_probs": np.stack([np.full((28, 28), -1e-3), np.full((28, 28), -0.1)]).astype(np.float32)}
    results = pixelcnn.anomaly_results(out, np.array([0, 0]), ref, alpha=0.1)
    assert [r["anomalous"] for r in results] == [False, True]         # ~1 bit, then ~113 bits: above all 100
    assert results[1]["p_value"] == pytest.approx(1 / 101)
    assert set(results[0]) == {"score", "logprob", "bits_per_dim", "complexity_bits", "p_value", "anomalous"}


def test_an_alpha_no_p_value_can_pass_under_is_refused():
    ref = reference(np.arange(100.0).tolist())
    with pytest.raises(InvalidField) as e:
        pixelcnn.check_alpha(ref, 1 / 101)
    assert e.value.field == "alpha" and "1/101" in e.value.message
    pixelcnn.check_alpha(ref, 1 / 101 + 1e-9)


@pytest.mark.parametrize("scores, match", [
    ([float(i) for i in range(99)], "at least 100"),
    ([float(i) for i in range(100)][::-1], "ascending"),
    ([float(i) for i in range(99)] + [math.nan], "finite"),
])
def test_a_bad_reference_is_refused(scores, match):
    with pytest.raises(ValidationError, match=match):
        AnomalyReference(complexity="png-min-filter-zlib9", source="test", scores=scores)


def test_a_reference_measured_another_way_is_refused():
    with pytest.raises(ValidationError, match="complexity"):
        AnomalyReference(complexity="webp", source="test", scores=[float(i) for i in range(100)])


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
