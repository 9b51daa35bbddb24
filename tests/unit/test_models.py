"""The model files: causality of the PixelCNN, a normalised VAE likelihood, shapes and bounds."""

from __future__ import annotations

import math

import pytest
import torch

from training import gan as gan_lib
from training import pixelcnn as pcnn_lib
from training import vae as vae_lib


@pytest.fixture(scope="module", params=[0, 2], ids=["embedding", "label-maps"])
def pcnn(request):
    """Both ways the label enters: an embedding per layer (version 1), and with per-label spatial maps too."""
    torch.manual_seed(0)
    cfg = pcnn_lib.PixelCNNConfig(channels=8, n_layers=3, head_channels=16, label_maps=request.param)
    return pcnn_lib.PixelCNN(cfg).eval()


@pytest.mark.parametrize("t", [0, 1, 27, 28, 29, 300, 782])
def test_pixelcnn_is_causal_and_has_no_blind_spot(pcnn, t):
    """Changing pixel t changes no logits at positions <= t, and does change the logits of pixel t + 1
    and of the pixel right below it (the gated stacks have no blind spot)."""
    x = torch.randint(0, 256, (1, 1, 28, 28)).float()
    y = torch.tensor([10 if t % 2 else 4])
    r, c = divmod(t, 28)
    x2 = x.clone()
    x2[0, 0, r, c] = 255.0 - x2[0, 0, r, c]
    with torch.no_grad():
        diff = (pcnn(x2, y) - pcnn(x, y)).abs().amax(dim=1).flatten()   # (784,)
    assert diff[: t + 1].max() == 0
    if c < 27:                               # the next pixel in the row always sees this one
        assert diff[t + 1] > 0
    if t + 28 < 784:
        assert diff[t + 28] > 0


def test_pixelcnn_receptive_field_reaches_far_above_right(pcnn):
    """A pixel up and to the right (the original PixelCNN's blind spot) influences the current pixel."""
    x = torch.zeros(1, 1, 28, 28)
    x2 = x.clone()
    x2[0, 0, 10, 16] = 200.0                 # above and to the right of (12, 14)
    with torch.no_grad():
        d = (pcnn(x2, torch.tensor([10])) - pcnn(x, torch.tensor([10]))).abs().amax(dim=1)
    assert d[0, 12, 14] > 0


def test_pixelcnn_split_equals_full_pass(pcnn):
    x, y = torch.randint(0, 256, (2, 1, 28, 28)).float(), torch.tensor([3, 10])
    with torch.no_grad():
        full = pcnn(x, y)
        vf = pcnn.vertical_features(x, y)
        row = pcnn.horizontal(x[:, :, 7:8], vf[:, :, :, 7:8])
        crop = pcnn.vertical_features(x[:, :, :8], y)            # rows <= 7 are enough for row 7
    torch.testing.assert_close(row[:, :, 0], full[:, :, 7])
    torch.testing.assert_close(crop[:, :, :, 7], vf[:, :, :, 7])


def test_pixelcnn_fast_sampler_matches_naive(pcnn):
    y = torch.tensor([1, 10])
    u = torch.rand(2, 784, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pcnn_lib.sample_fast(pcnn, y, u, 0.9), pcnn_lib.sample_naive(pcnn, y, u, 0.9))


def test_sample_from_logits_inverts_the_cdf():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25] + [1e-12] * 253]))
    for u, want in [(0.0, 0), (0.49, 0), (0.51, 1), (0.74, 1), (0.76, 2), (0.999, 2)]:
        assert pcnn_lib.sample_from_logits(logits, torch.tensor([u])).item() == want


def test_discretized_logistic_is_a_distribution_over_256_values():
    values = torch.arange(256.0).view(256, 1, 1, 1)
    for loc, log_scale in [(-1.0, -3.0), (0.3, -1.0), (0.99, -5.0), (0.0, 1.0)]:
        lp = vae_lib.discretized_logistic_log_prob(
            values, torch.full_like(values, loc), torch.full_like(values, log_scale))
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_vae_bounds_are_ordered_and_in_bits():
    torch.manual_seed(0)
    m = vae_lib.VAE(vae_lib.VAEConfig(latent_dim=4, channels=4, hidden=16)).eval()
    x = torch.randint(0, 256, (3, 1, 28, 28)).float()
    with torch.no_grad():
        neg_elbo, rec, kl = vae_lib.negative_elbo(m, x)
    iw = vae_lib.importance_weighted_bound(m, x, k=64)
    assert (kl >= 0).all() and torch.allclose(neg_elbo, rec + kl)
    # IWAE is a tighter bound than the ELBO on average: -iw <= E[-elbo] (checked on the mean, with slack)
    assert (-iw).mean() <= neg_elbo.mean() + 1.0
    assert vae_lib.bits_per_dim(torch.tensor(784 * math.log(2.0))).item() == pytest.approx(1.0)


def test_gan_shapes_and_eval_mode_batch_independence():
    torch.manual_seed(0)
    cfg = gan_lib.GANConfig(z_dim=8, g_channels=8, d_channels=4)
    g, d = gan_lib.Generator(cfg).eval(), gan_lib.Discriminator(cfg)
    z, y = torch.randn(4, 8), torch.tensor([0, 3, 9, 5])
    with torch.no_grad():
        img = g(z, y)
        alone = g(z[:1], y[:1])
    assert img.shape == (4, 1, 28, 28) and img.abs().max() <= 1
    torch.testing.assert_close(alone, img[:1])       # served images never depend on batch neighbours
    logit, classes = d(img, y)
    assert logit.shape == (4,) and classes.shape == (4, cfg.num_classes)
