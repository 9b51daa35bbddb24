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




@pytest.mark.parametrize("first, n", [(0, 1), (0, 28), (1, 1), (2, 1), (5, 9), (27, 1)])
def test_pixelcnn_vertical_step_equals_the_full_stack(pcnn, first, n):
    """n rows stepped from the cache of the rows above them are those rows of vertical_features, and the new cache
    rows are the layers' outputs there; whatever lies above the image in the window and cache is masked."""
    p, depth, c = pcnn.cfg.kernel // 2, pcnn.cfg.n_layers - 1, pcnn.cfg.channels
    x, y = torch.randint(0, 256, (2, 1, 28, 28)).float(), torch.tensor([3, 10])
    garbage = torch.full((2, 1, p + 1, 28), 99.0)                      # rows -p-1 .. -1
    padded = torch.cat([garbage, x], dim=2)
    with torch.no_grad():
        full = pcnn.vertical_features(x, y)
        vcache = torch.randn(2, depth, c, p, 28)                         # rows above the image: masked
        if first > 0:                                                    # the true cache: step the rows above
            _, vnew = pcnn.vertical_step(padded[:, :, : p + first], torch.zeros(2, depth, c, p, 28), y,
                                         torch.zeros(2, dtype=torch.long))
            vcache = torch.cat([vcache, vnew], dim=3)[:, :, :, -p:]
        vfeats, vnew = pcnn.vertical_step(padded[:, :, first: first + p + n], vcache, y, torch.full((2,), first))
    assert vfeats.shape == (2, depth + 1, 2 * c, n, 28) and vnew.shape == (2, depth, c, n, 28)
    torch.testing.assert_close(vfeats, full[:, :, :, first: first + n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("first, n", [(0, 1), (0, 28), (1, 1), (2, 1), (7, 5), (27, 1)])
def test_pixelcnn_horizontal_step_equals_the_full_pass(pcnn, first, n):
    """n columns of one row stepped from the cache of the columns to their left give the full pass's logits
    there; whatever lies left of the image is masked."""
    p, depth, c = pcnn.cfg.kernel // 2, pcnn.cfg.n_layers - 1, pcnn.cfg.channels
    x, y, r = torch.randint(0, 256, (2, 1, 28, 28)).float(), torch.tensor([3, 10]), 12
    padded = torch.cat([torch.full((2, 1, 1, p + 1), 99.0), x[:, :, r:r + 1]], dim=3)  # columns -p-1 .. 27
    with torch.no_grad():
        full, vf = pcnn(x, y), pcnn.vertical_features(x, y)[:, :, :, r:r + 1]
        hcache = torch.randn(2, depth, c, 1, p)
        if first > 0:
            _, hnew = pcnn.horizontal_step(padded[..., : p + first], hcache, vf[..., :first],
                                           torch.zeros(2, dtype=torch.long))
            hcache = torch.cat([hcache, hnew], dim=4)[..., -p:]
        logits, hnew = pcnn.horizontal_step(padded[..., first: first + p + n], hcache, vf[..., first: first + n],
                                            torch.full((2,), first))
    assert logits.shape == (2, 256, 1, n) and hnew.shape == (2, depth, c, 1, n)
    torch.testing.assert_close(logits[:, :, 0], full[:, :, r, first: first + n], rtol=0, atol=1e-5)


def test_pixelcnn_fast_and_cached_samplers_match_naive(pcnn):
    """Every one of the 784 pixels: the row-cached and the activation-cached samplers against the whole network
    per pixel. One torch thread: on a busy 2-core machine torch's thread barriers make 784 small passes crawl."""
    y = torch.tensor([4, 10, 7])
    u = torch.rand(3, 784, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        naive = pcnn_lib.sample_naive(pcnn, y, u, 0.8)
        assert torch.equal(pcnn_lib.sample_fast(pcnn, y, u, 0.8), naive)
        assert torch.equal(pcnn_lib.sample_cached(pcnn, y, u, 0.8), naive)
    finally:
        torch.set_num_threads(threads)
    assert len(naive.unique()) > 10


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
