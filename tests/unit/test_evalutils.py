"""Tests for training/evalutils.py: Fréchet distance, codec bits/dim, image grid, PNG writing, Spearman."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import load_dataset
from training.evalutils import codec_bits_per_dim, frechet_distance, image_grid, save_png, spearman


@pytest.fixture(scope="module")
def feats() -> np.ndarray:
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(6, 6))
    return rng.normal(size=(3000, 6)) @ mix + rng.normal(size=6)  # correlated, non-zero mean


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    ds = load_dataset()
    return ds.images[::50]  # 100 images, 10 per class


def test_frechet_identical_sets_is_zero(feats: np.ndarray) -> None:
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(feats, feats[::-1]) == pytest.approx(0.0, abs=1e-6)


def test_frechet_shift_equals_squared_mean_difference(feats: np.ndarray) -> None:
    delta = np.array([1.0, -2.0, 0.5, 0.0, 3.0, -0.25])
    d = frechet_distance(feats, feats + delta)
    assert d > 0
    assert d == pytest.approx(float(delta @ delta), rel=1e-6)


def test_frechet_scaled_set_matches_closed_form(feats: np.ndarray) -> None:
    # b = 2a: S_b = 4 S_a, (S_a S_b)^(1/2) = 2 S_a  =>  d = ||mu_a||^2 + tr(S_a)
    expected = float(feats.mean(0) @ feats.mean(0) + np.trace(np.cov(feats, rowvar=False)))
    assert frechet_distance(feats, 2.0 * feats) == pytest.approx(expected, rel=1e-6)


def test_frechet_is_symmetric_and_finite_when_rank_deficient() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 0.5
    d1, d2 = frechet_distance(a, b), frechet_distance(b, a)
    assert np.isfinite(d1) and d1 > 0
    assert d1 == pytest.approx(d2, rel=1e-4)
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :5])


def test_frechet_one_dimensional_features() -> None:
    a = np.array([0.0, 1.0, 2.0, 3.0])
    assert frechet_distance(a, a + 2.0) == pytest.approx(4.0)


def test_codec_bits_per_dim_on_real_digits(digits: np.ndarray) -> None:
    bpd = codec_bits_per_dim(digits)
    assert set(bpd) == {"png", "webp_lossless"}
    for key, value in bpd.items():
        assert 0.0 < value < 8.0, (key, value)
    # check the formula on one image against a direct encoding
    one = codec_bits_per_dim(digits[:1])
    import io

    buf = io.BytesIO()
    Image.fromarray(digits[0]).save(buf, format="PNG", optimize=True)
    assert one["png"] == pytest.approx(8 * len(buf.getvalue()) / 784)


def test_codec_noise_costs_more_than_digits(digits: np.ndarray) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    n, d = codec_bits_per_dim(noise), codec_bits_per_dim(digits[:10])
    assert n["png"] > 7.5 and n["webp_lossless"] > 7.5  # incompressible (plus headers)
    assert d["png"] < n["png"] and d["webp_lossless"] < n["webp_lossless"]


def test_image_grid_shape_and_placement(digits: np.ndarray) -> None:
    imgs = digits[:10]
    grid = image_grid(imgs, nrow=4, pad=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (3 * 30 + 2, 4 * 30 + 2)
    np.testing.assert_array_equal(grid[2:30, 2:30], imgs[0])
    np.testing.assert_array_equal(grid[2:30, 32:60], imgs[1])
    np.testing.assert_array_equal(grid[32:60, 2:30], imgs[4])
    np.testing.assert_array_equal(grid[62:90, 32:60], imgs[9])
    assert grid[0].max() == 0 and grid[62:90, 62:90].max() == 0  # padding and the empty cells
    assert image_grid(imgs[:3], nrow=8, pad=0).shape == (28, 84)
    assert image_grid(imgs[:4], nrow=2, pad=1, pad_value=255)[0, 0] == 255


def test_save_png_round_trip(tmp_path: Path, digits: np.ndarray) -> None:
    grid = image_grid(digits[:6], nrow=3)
    out = tmp_path / "sub" / "grid.png"
    save_png(grid, out)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), grid)


def test_spearman() -> None:
    x = np.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, np.ones(10)) == 0.0
    assert spearman([1.0], [2.0]) == 0.0
    y = x.copy()
    y[3] = np.nan
    assert spearman(x, y) == pytest.approx(1.0)
    assert -1.0 <= spearman(np.random.default_rng(0).normal(size=50), x.tolist() * 5) <= 1.0
