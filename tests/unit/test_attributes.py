"""Tests for training/attributes.py (Morpho-MNIST thickness and slant): sign and scale conventions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from training.attributes import measure, slant, thickness
from training.data import load_dataset


def bar(width: int, shear: float = 0.0, top: int = 4, height: int = 20) -> np.ndarray:
    """A white vertical bar on black, `width` px wide; shear > 0 shifts the TOP to the right."""
    img = np.zeros((28, 28), dtype=np.uint8)
    mid = top + (height - 1) / 2
    for r in range(top, top + height):
        left = int(round(14 - width / 2 - shear * (r - mid)))
        img[r, left:left + width] = 255
    return img


@pytest.fixture(scope="module")
def real_digits() -> tuple[np.ndarray, np.ndarray]:
    ds = load_dataset()
    idx = np.concatenate([np.flatnonzero(ds.labels == c)[:30] for c in range(10)])
    return ds.images[idx], ds.labels[idx]


@pytest.mark.parametrize("width", [2, 5])
def test_bar_thickness_close_to_its_width(width: int) -> None:
    assert thickness(bar(width)) == pytest.approx(width, rel=0.25)


def test_thickness_increases_with_bar_width() -> None:
    values = [thickness(bar(w)) for w in range(1, 8)]
    assert all(b > a for a, b in zip(values, values[1:], strict=False)), values
    assert thickness(bar(2)) < thickness(bar(5))


def test_thickness_is_about_invariant_to_shear() -> None:
    assert thickness(bar(3, shear=0.3)) == pytest.approx(thickness(bar(3)), rel=0.25)


def test_upright_bar_has_zero_slant() -> None:
    assert abs(slant(bar(3))) < 0.02
    assert abs(slant(bar(6))) < 0.02


@pytest.mark.parametrize("shear", [0.15, 0.3, 0.5])
def test_bar_leaning_right_has_positive_slant_matching_its_shear(shear: float) -> None:
    right = slant(bar(3, shear=shear))
    left = slant(bar(3, shear=-shear))
    assert right > 0.05 and left < -0.05
    assert right == pytest.approx(np.arctan(shear), abs=0.05)
    assert left == pytest.approx(-right, abs=0.05)


def test_mirroring_flips_the_sign_of_slant(real_digits) -> None:
    images, _ = real_digits
    for img in images[::37]:
        assert slant(img[:, ::-1]) == pytest.approx(-slant(img), abs=1e-9)


def test_empty_image_gives_zero() -> None:
    empty = np.zeros((28, 28), dtype=np.uint8)
    assert thickness(empty) == 0.0 and slant(empty) == 0.0
    faint = np.full((28, 28), 40, dtype=np.uint8)  # nothing reaches half intensity
    assert thickness(faint) == 0.0 and slant(faint) == 0.0
    out = measure(np.zeros((3, 28, 28), dtype=np.uint8))
    assert out["thickness"].tolist() == [0.0] * 3 and out["slant"].tolist() == [0.0] * 3


def test_measure_matches_single_image_functions(real_digits) -> None:
    images, _ = real_digits
    sub = images[::15]
    out = measure(sub)
    assert set(out) == {"thickness", "slant"}
    assert out["thickness"].shape == (len(sub),) and out["slant"].shape == (len(sub),)
    np.testing.assert_allclose(out["thickness"], [thickness(im) for im in sub])
    np.testing.assert_allclose(out["slant"], [slant(im) for im in sub])


def test_real_digits_have_plausible_thickness(real_digits) -> None:
    images, _ = real_digits
    th = measure(images)["thickness"]
    assert np.all(np.isfinite(th))
    assert np.mean((th >= 1.0) & (th <= 6.0)) >= 0.97, np.percentile(th, [0, 5, 50, 95, 100])
    assert 1.5 <= np.median(th) <= 4.0


def test_dilating_real_digits_makes_them_thicker(real_digits) -> None:
    images, _ = real_digits
    sub = images[::10]
    thicker = np.stack([ndimage.grey_dilation(im, size=(3, 3)) for im in sub])
    before, after = measure(sub)["thickness"], measure(thicker)["thickness"]
    assert np.all(after > before)
    assert np.mean(after - before) == pytest.approx(2.0, abs=0.8)  # a 3x3 dilation adds ~1 px per side


def test_real_ones_lean_right_on_average(real_digits) -> None:
    # Handwritten MNIST "1"s mostly lean to the right: with the sign convention their mean slant is > 0.
    images, labels = real_digits
    assert measure(images[labels == 1])["slant"].mean() > 0.05
