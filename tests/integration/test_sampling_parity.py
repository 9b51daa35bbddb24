"""PixelCNN sampling through the exported ONNX graphs gives exactly the images PyTorch gives from the same uniforms.

A tiny randomly initialised PixelCNN is exported once per session (the export is the slow part); naive (whole image
per pixel), fast (row-cached) and cached (activation-cached step graphs) ONNX sampling, and torch's samplers, must
agree pixel for pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.sampler import sample_cached, sample_fast, sample_naive, sample_pixel
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


def test_cached_equals_naive_and_torch(tiny_pixelcnn_onnx, tiny_pixelcnn_steps) -> None:
    """All 784 pixels of the step graphs' images against the whole network per pixel, and against torch's
    activation-cached sampler."""
    model, vstack, hrow = tiny_pixelcnn_onnx
    labels = np.array([2, 10, 9])
    u = np.random.default_rng(5).random((labels.size, 28 * 28))
    cached = sample_cached(*tiny_pixelcnn_steps, labels, u, 0.9)
    np.testing.assert_array_equal(cached, sample_naive(vstack, hrow, labels, u, 0.9))
    ref = pcnn.sample_cached(model, torch.from_numpy(labels), torch.from_numpy(u), 0.9)
    np.testing.assert_array_equal(cached, ref[:, 0].numpy().astype(np.uint8))
    assert len(np.unique(cached)) > 10


def test_cached_guided_completions_equal_the_row_cached_ones(tiny_pixelcnn_onnx, tiny_pixelcnn_steps) -> None:
    _, vstack, hrow = tiny_pixelcnn_onnx
    labels = np.array([6, 10])
    u = np.random.default_rng(6).random((2, 784))
    images = np.random.default_rng(7).integers(0, 256, (2, 28, 28)).astype(np.uint8)
    known = np.zeros((2, 784), bool)
    known[0, :300] = True  # from mid-row 10
    known[1, 100:140] = True  # known pixels after unknown ones
    given = (images, known)
    cached = sample_cached(*tiny_pixelcnn_steps, labels, u, 1.0, 2.0, any_label=10, given=given)
    np.testing.assert_array_equal(cached, sample_fast(vstack, hrow, labels, u, 1.0, 2.0, any_label=10, given=given))
    np.testing.assert_array_equal(cached.reshape(2, -1)[known], images.reshape(2, -1)[known])


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


@pytest.mark.slow
@pytest.mark.parametrize("other", ["kernel 7", "other weights"])
def test_step_graphs_of_another_network_are_refused(tmp_path, other: str) -> None:
    """A version is one network: step graphs exported from another one are refused at load, by their shapes
    (the store) or by what they compute (the runtime checks them against vstack and hrow), never served."""
    from service.metrics import Metrics
    from service.runtime import Registry
    from service.settings import Settings
    from service.store import StoreError
    from training.export import pixelcnn_graphs, pixelcnn_step_graphs, write_version

    torch.manual_seed(0)
    cfg = pcnn.PixelCNNConfig(channels=8, n_layers=3, head_channels=16)
    own = pcnn.PixelCNN(cfg).eval()
    torch.manual_seed(1)
    foreign = pcnn.PixelCNN(pcnn.PixelCNNConfig(**{**cfg.to_dict(), "kernel": 7 if other == "kernel 7" else 5}))
    graphs = {**pixelcnn_graphs(own, steps=False), "vstep": pixelcnn_step_graphs(own)["vstep"],
              "hstep": pixelcnn_step_graphs(foreign.eval())["hstep"]}
    if other == "kernel 7":  # the store's contract refuses it, so the export's own validation does too
        with pytest.raises(StoreError, match=r"graph 'hstep' tensor 'hcache' must be \(batch, 2, 8, 1, 2\)"):
            write_version(tmp_path, "pixelcnn", "pixelcnn", 1, graphs, model=cfg.to_dict())
        return
    write_version(tmp_path, "pixelcnn", "pixelcnn", 1, graphs, model=cfg.to_dict())
    registry = Registry(Settings(store_path=tmp_path, providers="cpu", warmup=False, intra_op_threads=1,
                                 worker_threads=1), Metrics())
    refused: dict[str, list[str]] = {}
    try:
        assert registry.build([tmp_path / "pixelcnn" / "1"], refused) == []  # even with warm-up off
    finally:
        registry.executor.shutdown()
    (problems,) = refused.values()
    assert any("the step graphs disagree with vstack and hrow" in p and "hstep" in p for p in problems), problems
