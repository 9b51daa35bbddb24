"""A small digit classifier, the judge of generated samples (imports only torch).

Used only for evaluation: accuracy of class-conditional GAN samples, the class histogram of unconditional
samples, and a Frechet distance (Heusel et al., 2017, arXiv:1706.08500) in its penultimate feature space,
the MNIST analogue of FID's Inception features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ClassifierConfig:
    channels: int = 32
    features: int = 128     # dimension of the feature space used for the Frechet distance
    dropout: float = 0.3

    def to_dict(self) -> dict:
        return asdict(self)


class DigitClassifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        c = cfg.channels
        self.cfg = cfg
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),          # (B, c, 14, 14)
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(2 * c * 49, cfg.features), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.features, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, 28, 28) pixel values 0..255 -> (B, F)."""
        return self.body(x / 127.5 - 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def classifier_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def random_shift(x: torch.Tensor, max_shift: int = 2) -> torch.Tensor:
    """Augmentation: translate each image by up to max_shift pixels (zero fill). x (B, 1, H, W)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (b,))
    dy = torch.randint(0, 2 * max_shift + 1, (b,))
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
