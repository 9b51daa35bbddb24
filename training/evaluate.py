"""Held-out evaluation of every model; the numbers go into the manifests and the README.

Every metric is computed on the held-out split (index % 10 == 9), which no model trains on.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from training import attributes as attr_lib
from training import classifier as clf_lib
from training import gan as gan_lib
from training import pixelcnn as pcnn_lib
from training import vae as vae_lib
from training.data import Dataset
from training.evalutils import codec_bits_per_dim, frechet_distance, spearman
from training.train import tensors

EDIT_STRENGTHS = (-2.0, -1.0, 0.0, 1.0, 2.0)
ATTRIBUTE_INFO = {
    "thickness": ("stroke thickness (Morpho-MNIST: twice the mean distance-map value along the skeleton)", "px"),
    "slant": ("slant (Morpho-MNIST: arctan of the horizontal shear from second-order moments; > 0 leans right)",
              "rad"),
}


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.no_grad()
def classify(model: clf_lib.DigitClassifier, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """x (N, 1, 28, 28) pixels -> predicted labels (N,), features (N, F)."""
    preds, feats = [], []
    for s in _chunks(len(x), 500):
        f = model.features(x[s])
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(preds).numpy(), torch.cat(feats).numpy()


def eval_classifier(model: clf_lib.DigitClassifier, heldout: Dataset) -> dict:
    x, y = tensors(heldout)
    pred, _ = classify(model, x)
    return {"heldout_accuracy": float((pred == y.numpy()).mean())}


@torch.no_grad()
def eval_pixelcnn(model: pcnn_lib.PixelCNN, heldout: Dataset) -> dict:
    x, y = tensors(heldout)
    any_digit = torch.full_like(y, model.cfg.num_classes)
    uncond, cond = [], []
    for s in _chunks(len(x), 50):
        uncond.append(pcnn_lib.log_prob_per_pixel(model(x[s], any_digit[s]), x[s]).flatten(1).sum(1))
        if heldout.labels is not None:
            cond.append(pcnn_lib.log_prob_per_pixel(model(x[s], y[s]), x[s]).flatten(1).sum(1))
    to_bpd = 784 * math.log(2.0)
    out = {"heldout_bits_per_dim": float(-torch.cat(uncond).mean() / to_bpd),
           "heldout_nll_nats": float(-torch.cat(uncond).mean())}
    if cond:
        out["heldout_bits_per_dim_given_label"] = float(-torch.cat(cond).mean() / to_bpd)
    out["codec_bits_per_dim"] = codec_bits_per_dim(heldout.images)
    return out


@torch.no_grad()
def eval_vae(model: vae_lib.VAE, heldout: Dataset, clf: clf_lib.DigitClassifier, k: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    x, _ = tensors(heldout)
    neg_elbo, rec, kl = vae_lib.negative_elbo(model, x)
    iw = vae_lib.importance_weighted_bound(model, x, k)
    mean, _ = model.encoder(x)
    loc, _ = model.decoder(mean)
    recon = vae_lib.decode_to_pixels(loc).round()
    samples = vae_lib.decode_to_pixels(model.decoder(torch.randn(len(x), model.cfg.latent_dim))[0]).round()
    _, f_real = classify(clf, x)
    _, f_fake = classify(clf, samples)
    return {
        "heldout_neg_elbo_bits_per_dim": float(vae_lib.bits_per_dim(neg_elbo).mean()),
        "heldout_iwae_bits_per_dim": float(vae_lib.bits_per_dim(-iw).mean()),
        "iwae_samples": k,
        "heldout_kl_nats": float(kl.mean()),
        "reconstruction_mse": float(((recon - x) ** 2).mean()),          # pixel units (0..255) squared
        "reconstruction_mae": float((recon - x).abs().mean()),
        "frechet_distance_samples": frechet_distance(f_real, f_fake),
    }


@torch.no_grad()
def fit_attribute_directions(model: vae_lib.VAE, train: Dataset) -> tuple[dict, dict[str, np.ndarray]]:
    """Least squares z = [a_thickness, a_slant, onehot(class)] W: each attribute's row of W is the latent
    move per +1 standard deviation of that attribute, with digit class and the other attribute held fixed."""
    x, y = tensors(train)
    z = torch.cat([model.encoder(x[s])[0] for s in _chunks(len(x), 500)]).numpy().astype(np.float64)
    measured = attr_lib.measure(train.images)
    names = list(ATTRIBUTE_INFO)
    stats = {n: (float(measured[n].mean()), float(measured[n].std())) for n in names}
    a = np.stack([(measured[n] - stats[n][0]) / stats[n][1] for n in names], axis=1)    # (N, 2) standardised
    onehot = np.eye(10)[y.numpy()] if train.labels is not None else np.ones((len(x), 1))
    design = np.concatenate([a, onehot], axis=1)
    w, *_ = np.linalg.lstsq(design, z, rcond=None)                                       # (2 + K, D)
    directions = {n: w[i] for i, n in enumerate(names)}
    out = {n: {"description": ATTRIBUTE_INFO[n][0], "unit": ATTRIBUTE_INFO[n][1], "mean": stats[n][0],
               "std": stats[n][1], "direction": [float(v) for v in directions[n]]} for n in names}
    return out, directions


@torch.no_grad()
def eval_attribute_edits(model: vae_lib.VAE, heldout: Dataset, directions: dict[str, np.ndarray],
                         stds: dict[str, float], clf: clf_lib.DigitClassifier) -> dict:
    """For strengths -2..+2: per-image Spearman(strength, measured attribute of the decoded edit), averaged;
    the pooled Spearman of strength against the change from the unedited decode; the mean change per unit
    strength in training standard deviations; and how often the classifier still sees the original digit."""
    x, y = tensors(heldout)
    mean, _ = model.encoder(x)
    out = {}
    for name, d in directions.items():
        measured, kept = [], []
        for s in EDIT_STRENGTHS:
            z = mean + s * torch.from_numpy(d).float()
            imgs = vae_lib.decode_to_pixels(model.decoder(z)[0]).round()
            measured.append(attr_lib.measure(imgs.squeeze(1).to(torch.uint8).numpy())[name])
            if s != 0.0 and heldout.labels is not None:
                kept.append(classify(clf, imgs)[0] == y.numpy())
        m = np.stack(measured, axis=1)                                   # (N, strengths)
        per_image = [spearman(EDIT_STRENGTHS, row) for row in m]
        delta = m - m[:, [EDIT_STRENGTHS.index(0.0)]]
        strengths = np.broadcast_to(np.array(EDIT_STRENGTHS), m.shape)
        slope = np.polyfit(strengths.ravel(), delta.ravel(), 1)[0] / stds[name]
        out[name] = {
            "spearman_mean_per_image": float(np.mean(per_image)),
            "spearman_pooled_change": spearman(strengths.ravel(), delta.ravel()),
            "measured_std_per_unit_strength": float(slope),
            "class_kept_rate": float(np.mean(kept)) if kept else None,
        }
    return {"strengths": list(EDIT_STRENGTHS), "attributes": out}


@torch.no_grad()
def eval_gan(g: gan_lib.Generator, cfg: gan_lib.GANConfig, clf: clf_lib.DigitClassifier, heldout: Dataset,
             per_class: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(cfg.num_classes).repeat_interleave(per_class)
    cond = gan_lib.to_pixels(g(torch.randn(len(labels), cfg.z_dim, generator=gen), labels)).round()
    pred, _ = classify(clf, cond)
    per_label = {str(k): float((pred[labels.numpy() == k] == k).mean()) for k in range(cfg.num_classes)}
    # "any digit": the host draws the label uniformly (the training classes are balanced)
    n = len(heldout.images)
    any_labels = torch.randint(0, cfg.num_classes, (n,), generator=gen)
    uncond = gan_lib.to_pixels(g(torch.randn(n, cfg.z_dim, generator=gen), any_labels)).round()
    upred, f_fake = classify(clf, uncond)
    _, f_real = classify(clf, tensors(heldout)[0])
    return {
        "conditional_accuracy": float((pred == labels.numpy()).mean()),
        "conditional_accuracy_per_label": per_label,
        "conditional_samples": int(len(labels)),
        "unconditional_class_histogram": np.bincount(upred, minlength=cfg.num_classes).tolist(),
        "frechet_distance_samples": frechet_distance(f_real, f_fake),
    }


def frechet_reference(clf: clf_lib.DigitClassifier, train: Dataset, heldout: Dataset) -> float:
    """Frechet distance of real training images to the held-out ones: the floor a perfect generator reaches."""
    step = max(1, len(train.images) // len(heldout.images))   # evenly spaced: the source may be sorted by class
    _, f_train = classify(clf, tensors(train)[0][::step][:len(heldout.images)])
    _, f_held = classify(clf, tensors(heldout)[0])
    return frechet_distance(f_held, f_train)
