"""Convolutional VAE with a discretized logistic likelihood over 8-bit pixels (imports only torch).

Kingma & Welling, 2014, "Auto-Encoding Variational Bayes" (arXiv:1312.6114):
encoder q(z|x) = N(mean, diag(exp(logvar))),
prior p(z) = N(0, I), trained on the ELBO, a lower bound of log p(x).
The likelihood p(x|z) is a discretized logistic per pixel (Salimans et al., 2017, PixelCNN++, arXiv:1701.05517):
each of the 256 values gets the logistic mass of its bin, the end bins absorb the tails. It is a proper distribution
over 8-bit images, so the bound is in the same units (bits/dim) as the PixelCNN's exact likelihood.
Importance-weighted bound: Burda et al., 2016, "Importance Weighted Autoencoders" (arXiv:1509.00519).

Pixels enter and leave the exported graphs as float values in 0..255; -1..1 is used inside.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VAEConfig:
    latent_dim: int = 16
    channels: int = 32     # width of the first conv; the second has twice as many
    hidden: int = 256      # fully connected bottleneck width
    image_size: int = 28

    def to_dict(self) -> dict:
        return asdict(self)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c = cfg.channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c, 4, 2, 1), nn.SiLU(),              # (B, c, 14, 14)
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.SiLU(),          # (B, 2c, 7, 7)
            nn.Conv2d(2 * c, 2 * c, 3, 2, 1), nn.SiLU(),      # (B, 2c, 4, 4): keeps the linear layer small
            nn.Flatten(), nn.Linear(2 * c * 16, cfg.hidden), nn.SiLU(),
            nn.Linear(cfg.hidden, 2 * cfg.latent_dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 1, 28, 28) pixel values 0..255 -> mean (B, D), logvar (B, D)."""
        mean, logvar = self.net(x / 127.5 - 1.0).chunk(2, dim=1)
        return mean, logvar.clamp(-12.0, 6.0)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c = cfg.channels
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim, cfg.hidden), nn.SiLU(),
                                nn.Linear(cfg.hidden, 2 * c * 16), nn.SiLU())
        self.net = nn.Sequential(
            nn.ConvTranspose2d(2 * c, 2 * c, 3, 2, 1), nn.SiLU(),  # (B, 2c, 7, 7)
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1), nn.SiLU(),   # (B, c, 14, 14)
            nn.ConvTranspose2d(c, c, 4, 2, 1), nn.SiLU(),       # (B, c, 28, 28)
            nn.Conv2d(c, 2, 3, 1, 1),                           # (B, 2, 28, 28): loc, log_scale
        )
        self.c = c

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, D) -> loc (B, 1, 28, 28) in -1..1 units, log_scale (B, 1, 28, 28)."""
        h = self.fc(z).view(-1, 2 * self.c, 4, 4)
        loc, log_scale = self.net(h).chunk(2, dim=1)
        return loc, log_scale.clamp(min=-7.0)


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mean, logvar = self.encoder(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)   # reparameterisation trick
        loc, log_scale = self.decoder(z)
        return {"mean": mean, "logvar": logvar, "z": z, "loc": loc, "log_scale": log_scale}


# --- likelihood and bounds ---------------------------------------------------------------------

def discretized_logistic_log_prob(x: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x | loc, scale) per pixel in nats. x (B, 1, H, W) values 0..255; loc, log_scale in -1..1 units."""
    xn = x / 127.5 - 1.0
    half_bin = 1.0 / 255.0
    inv_s = torch.exp(-log_scale)
    plus = inv_s * (xn - loc + half_bin)
    minus = inv_s * (xn - loc - half_bin)
    log_cdf_plus = plus - F.softplus(plus)                # log sigmoid(plus): mass of (-inf, 0.5] for x == 0
    log_sf_minus = -F.softplus(minus)                     # log (1 - sigmoid(minus)): mass of [254.5, inf) for x == 255
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    # when the bin mass underflows, fall back to density x bin width (exact in the limit)
    mid = inv_s * (xn - loc)
    log_pdf_mid = mid - log_scale - 2.0 * F.softplus(mid)
    log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)),
                          log_pdf_mid + math.log(2.0 * half_bin))
    return torch.where(x < 0.5, log_cdf_plus, torch.where(x > 254.5, log_sf_minus, log_mid))


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per example, (B,)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def negative_elbo(model: VAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example -ELBO, reconstruction NLL and KL, all in nats, each (B,)."""
    out = model(x)
    rec = -discretized_logistic_log_prob(x, out["loc"], out["log_scale"]).flatten(1).sum(dim=1)
    kl = gaussian_kl(out["mean"], out["logvar"])
    return rec + kl, rec, kl


def bits_per_dim(nats: torch.Tensor, dims: int = 784) -> torch.Tensor:
    return nats / (dims * math.log(2.0))


@torch.no_grad()
def importance_weighted_bound(model: VAE, x: torch.Tensor, k: int, chunk: int = 500) -> torch.Tensor:
    """IWAE bound log p(x) >= log mean_k p(x, z_k) / q(z_k | x), per example in nats. x (B, 1, H, W)."""
    mean, logvar = model.encoder(x)
    std = torch.exp(0.5 * logvar)
    out = []
    for i in range(x.shape[0]):
        log_w = []
        for start in range(0, k, chunk):
            n = min(chunk, k - start)
            eps = torch.randn(n, mean.shape[1])
            z = mean[i] + std[i] * eps                                          # (n, D)
            loc, log_scale = model.decoder(z)
            log_px_z = discretized_logistic_log_prob(x[i:i + 1].expand(n, -1, -1, -1), loc, log_scale)
            log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(dim=1)
            log_qz = -0.5 * (eps.pow(2) + math.log(2 * math.pi)).sum(dim=1) - torch.log(std[i]).sum()
            log_w.append(log_px_z.flatten(1).sum(dim=1) + log_pz - log_qz)
        out.append(torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k))
    return torch.stack(out)


def decode_to_pixels(loc: torch.Tensor) -> torch.Tensor:
    """Decoder location (-1..1) -> pixel values 0..255 (float, unrounded): the image the service returns."""
    return ((loc + 1.0) * 127.5).clamp(0.0, 255.0)
