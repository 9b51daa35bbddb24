"""PixelCNN sampling through the exported ONNX graphs gives exactly the images PyTorch gives from the same uniforms.

A tiny randomly initialised PixelCNN is exported once per module (the export is the slow part); naive (whole image
per pixel) and fast (row-cached) ONNX sampling, and torch's fast sampler, must agree pixel for pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.sampler import sample_fast, sample_naive, sample_pixel
from training import pixelcnn as pcnn


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fast_equals_naive_and_torch(tiny_pixelcnn_onnx, temperature: float) -> None:
    model, vstack, hrow = tiny_pixelcnn_onnx
    labels = np.array([3, 10, 7])  # 10 = any digit
    u = np.random.default_rng(int(temperature * 10)).random((labels.size, 28 * 28))

    fast = sample_fast(vstack, hrow, labels, u, temperature)
    naive = sample_naive(vstack, hrow, labels, u, temperature)
    ref = pcnn.sample_fast(model, torch.from_numpy(labels), torch.from_numpy(u), temperature)

    assert fast.shape == (3, 28, 28) and fast.dtype == np.uint8
    np.testing.assert_array_equal(fast, naive)
    np.testing.assert_array_equal(fast, ref[:, 0].numpy().astype(np.uint8))
    assert len(np.unique(fast)) > 10  # a random model samples varied values, not a constant image


def test_fast_is_deterministic_and_u_matters(tiny_pixelcnn_onnx) -> None:
    _, vstack, hrow = tiny_pixelcnn_onnx
    labels = np.array([5, 10])
    u = np.random.default_rng(1).random((2, 784))
    first = sample_fast(vstack, hrow, labels, u)
    np.testing.assert_array_equal(first, sample_fast(vstack, hrow, labels, u))
    assert (sample_fast(vstack, hrow, labels, np.roll(u, 1, axis=1)) != first).any()
    # batch composition does not matter: each row alone gives the same image
    np.testing.assert_array_equal(sample_fast(vstack, hrow, labels[1:], u[1:]), first[1:])


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_sample_pixel_matches_torch(temperature: float) -> None:
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((2000, 256)) * rng.uniform(0.1, 20.0, (2000, 1))).astype(np.float32)
    logits[:5] += 500.0  # large values: the stable softmax must not overflow
    u = rng.random(2000)
    u[:3] = [0.0, 1.0 - 1e-12, 0.5]
    got = sample_pixel(logits, u, temperature)
    want = pcnn.sample_from_logits(torch.from_numpy(logits), torch.from_numpy(u), temperature).numpy()
    assert got.shape == (2000,) and got.min() >= 0 and got.max() <= 255
    np.testing.assert_array_equal(got, want)


def test_sample_pixel_per_row_temperature() -> None:
    rng = np.random.default_rng(3)
    logits, u = rng.standard_normal((6, 256)).astype(np.float32), rng.random(6)
    temps = np.array([1.0, 0.7, 0.7, 1.0, 2.0, 0.3])
    per_row = sample_pixel(logits, u, temps)
    for t in np.unique(temps):
        rows = temps == t
        np.testing.assert_array_equal(per_row[rows], sample_pixel(logits[rows], u[rows], float(t)))


def test_bad_inputs_are_refused(tiny_pixelcnn_onnx) -> None:
    _, vstack, hrow = tiny_pixelcnn_onnx
    u = np.random.default_rng(0).random((1, 784))
    with pytest.raises(ValueError, match="u must have shape"):
        sample_fast(vstack, hrow, np.array([1, 2]), u)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sample_fast(vstack, hrow, np.array([1]), u + 1.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_fast(vstack, hrow, np.array([1]), u, 0.0)
    with pytest.raises(ValueError, match="labels"):
        sample_fast(vstack, hrow, np.array([1.5]), u)
