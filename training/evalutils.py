"""Evaluation helpers for generated digits (numpy / scipy / Pillow only; no torch).

* :func:`frechet_distance` - Fréchet distance between Gaussians fitted to two feature sets (FID-style).
* :func:`codec_bits_per_dim` - lossless-codec baselines (PNG, WebP lossless) in bits per pixel.
* :func:`image_grid` / :func:`save_png` - tile digits into one uint8 image and write it.
* :func:`spearman` - NaN-safe Spearman rank correlation.
* :func:`auroc` - area under the ROC curve of a score that should rank outliers above inliers.
* :func:`exported_graph` - one graph of an exported version, on ONNX Runtime's CPU provider.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from scipy import linalg, stats

from service.sampler import GraphFn, session_fn

__all__ = ["auroc", "codec_bits_per_dim", "exported_graph", "frechet_distance", "image_grid", "save_png",
           "spearman"]


def _features(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected features shaped (N, D), got {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 samples to estimate a covariance, got {a.shape[0]}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: features contain NaN or infinity")
    return a


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between N(mu_a, S_a) and N(mu_b, S_b) fitted to (N, D) feature arrays.

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})   (Heusel et al. 2017, the FID formula).
    Covariances are unbiased (``np.cov``).  The matrix square root is ``scipy.linalg.sqrtm``; if it is not
    finite (near-singular product) a small ``1e-6 * I`` is added to both covariances first, and the tiny
    imaginary parts that numerical error leaves are discarded.  Clamped at 0.
    """
    a = _features(feats_a, "feats_a")
    b = _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    diff = mu_a - mu_b

    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(s_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s_a + offset) @ (s_b + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real  # imaginary parts are numerical noise for PSD inputs
    d2 = float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))
    return max(d2, 0.0)


def _encoded_len(img: np.ndarray, fmt: str, **kwargs) -> int:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kwargs)
    return buf.tell()


def codec_bits_per_dim(images: np.ndarray) -> dict[str, float]:
    """Mean lossless-codec size in bits per pixel ("bits/dim") of (N, H, W) uint8 images.

    Each image is encoded on its own; bits/dim = 8 * len(bytes) / (H * W) (784 for MNIST), averaged over
    images.  Keys: ``"png"`` (Pillow, ``optimize=True``) and ``"webp_lossless"`` (Pillow WebP,
    ``lossless=True, quality=100, method=6``).  Container headers are included, so these are honest,
    if pessimistic, baselines to compare a model's negative log-likelihood in bits/dim against.
    """
    arr = _uint8_stack(images, "images")
    dims = arr.shape[1] * arr.shape[2]
    png = np.empty(len(arr))
    webp = np.empty(len(arr))
    for i, img in enumerate(arr):
        png[i] = _encoded_len(img, "PNG", optimize=True)
        webp[i] = _encoded_len(img, "WEBP", lossless=True, quality=100, method=6)
    return {"png": float(8.0 * png.mean() / dims), "webp_lossless": float(8.0 * webp.mean() / dims)}


def _uint8_stack(images: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, H, W) array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 pixels, got {arr.dtype}")
    return np.ascontiguousarray(arr)


def image_grid(images: np.ndarray, nrow: int, pad: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile (N, H, W) uint8 images into one uint8 image, ``nrow`` images per row (as torchvision).

    The grid has ``ceil(N / nrow)`` rows and ``min(nrow, N)`` columns, with ``pad`` pixels of
    ``pad_value`` between tiles and around the border, so its shape is
    ``(rows * (H + pad) + pad, cols * (W + pad) + pad)``.  Unused cells of the last row stay ``pad_value``.
    """
    arr = _uint8_stack(images, "images")
    if int(nrow) < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if int(pad) < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    n, h, w = arr.shape
    cols = min(int(nrow), n)
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), pad_value, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = arr[i]
    return grid


def save_png(arr: np.ndarray, path: str | os.PathLike) -> None:
    """Write a (H, W) grey-scale or (H, W, 3|4) uint8 array as a PNG, creating parent folders."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8 pixels, got {a.dtype}")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"save_png expects (H, W) or (H, W, 3|4), got shape {a.shape}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(a)).save(p, format="PNG")


def spearman(x, y) -> float:
    """Spearman rank correlation of two equal-length sequences; NaN-safe.

    Pairs where either value is NaN/inf are dropped.  Returns 0.0 when fewer than 2 pairs remain,
    when either side is constant, or when scipy returns NaN.
    """
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"spearman: length mismatch {a.shape[0]} vs {b.shape[0]}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return 0.0
    rho = float(stats.spearmanr(a, b).statistic)
    return rho if np.isfinite(rho) else 0.0


def auroc(inliers, outliers) -> float:
    """P(score of an outlier > score of an inlier), ties counting half: the area under the ROC curve of the
    score as a detector of outliers (the Mann-Whitney U statistic over the product of the sizes)."""
    a = np.asarray(inliers, dtype=np.float64).ravel()
    b = np.asarray(outliers, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("auroc needs finite scores on both sides")
    ranks = stats.rankdata(np.concatenate([a, b]))  # ties get their mean rank
    return float((ranks[a.size:].sum() - b.size * (b.size + 1) / 2) / (a.size * b.size))


def exported_graph(version_dir: str | os.PathLike, name: str) -> GraphFn:
    """`<version_dir>/<name>.onnx` as feeds -> {output: array}, on the CPU provider, quietly."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return session_fn(ort.InferenceSession(str(Path(version_dir) / f"{name}.onnx"), opts,
                                           providers=["CPUExecutionProvider"]))
