"""The PixelCNN: exact log-likelihood in one forward pass, and autoregressive sampling whose only randomness is
one uniform per pixel drawn from the seed. Labels condition on a digit; the extra label num_classes means
"any digit" (the model was trained with it in place of a label some of the time).

Anomaly scores follow Serra et al., 2020 ("Input complexity and out-of-distribution detection with likelihood-
based generative models"): -log2 p(x) alone ranks simple images (all black) as the likeliest of all (Nalisnick et
al., 2019), so the score subtracts the image's length under a general-purpose compressor, PNG. The verdict also
asks whether an image is likelier than digits ever are (anomaly_results).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from service.families.shared import (
    PIXEL_RANGE,
    InvalidField,
    TensorRules,
    image_size,
    label_array,
    num_classes,
    to_model,
)
from service.imaging import png_bits
from service.runtime import ModelVersion
from service.store import AnomalyReference, declared_tensor

LOGPROB = "logprob"
LN2 = math.log(2.0)


def input_size(mv: ModelVersion) -> tuple[int, int]:
    """(height, width) of the images the model scores and samples."""
    return image_size(mv)


def any_digit(mv: ModelVersion) -> int:
    """The label that conditions on no digit in particular: one past the digits."""
    return num_classes(mv)


def labels(mv: ModelVersion, given: int | list[int] | None, n: int) -> np.ndarray:
    """(n,) int64 labels of a request: the digits it gave, or "any digit"."""
    return label_array(given, n, any_digit(mv), num_classes(mv))


def logprob_inputs(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """(n, H, W) uint8 images and (n,) labels -> the logprob graph's inputs."""
    return {"image": to_model(images), "label": labels}


def logprob_results(out: dict[str, np.ndarray], per_pixel: bool) -> list[dict]:
    """The logprob graph's outputs, (n, H, W) log p(x_t | x_<t) in nats, as one result per image: log p(x) in
    nats and bits per dimension, and with `per_pixel` the map itself."""
    lp = out["log_probs"].astype(np.float64)
    n = len(lp)
    totals = lp.reshape(n, -1).sum(axis=1)
    results = []
    for i in range(n):
        r = {"logprob": float(totals[i]), "bits_per_dim": float(-totals[i] / (lp[i].size * LN2))}
        if per_pixel:
            r["per_pixel"] = lp[i].tolist()
        results.append(r)
    return results


def uniforms(seed: int, n: int, size: tuple[int, int]) -> np.ndarray:
    """(n, H*W) uniforms in [0, 1) from the seed alone: sampling's only randomness, one per pixel in raster order."""
    height, width = size
    return np.random.default_rng(seed).random((n, height * width))


def known_pixels(mv: ModelVersion, known_rows: int | None, mask: list[list[int]] | None) -> np.ndarray:
    """(H*W,) bool: which pixels of a completion's image are given, from `known_rows` (the top rows) or a 0/1 `mask`
    of the image's size; exactly one of them, leaving at least one pixel to draw."""
    height, width = input_size(mv)
    if (known_rows is None) == (mask is None):
        raise InvalidField("known_rows", "give exactly one of known_rows and mask")
    if known_rows is not None:
        if not 1 <= known_rows < height:
            raise InvalidField("known_rows", f"must lie in 1..{height - 1}")
        known = np.zeros((height, width), bool)
        known[:known_rows] = True
        return known.reshape(-1)
    array = np.asarray(mask, dtype=object)
    if array.shape != (height, width) or not all(v in (0, 1) and type(v) is int for v in array.flat):
        raise InvalidField("mask", f"must be {height}x{width} of 0 (draw) and 1 (known)")
    known = array.astype(bool).reshape(-1)
    if known.all():
        raise InvalidField("mask", "leaves no pixel to draw")
    return known


def anomaly_reference(mv: ModelVersion) -> AnomalyReference:
    """The held-out scores the version's export measured, which its p-values are read against."""
    if mv.manifest.anomaly is None:
        raise InvalidField("model_version", f"version {mv.manifest.version} has no anomaly reference in its "
                                            "manifest (`python -m training anomaly` measures one)")
    return mv.manifest.anomaly


def check_alpha(reference: AnomalyReference, alpha: float) -> None:
    """Each of the verdict's two tests runs at alpha / 2, and a p-value is at least 1 / (N + 1) with N reference
    digits: an alpha at or below 2 / (N + 1) could flag nothing."""
    least = 2.0 / (len(reference.scores) + 1)
    if alpha <= least:
        raise InvalidField("alpha", f"this version's verdict tests p-values of at least 1/{len(reference.scores) + 1} "
                                    f"against alpha / 2, so alpha must exceed 2/{len(reference.scores) + 1} = "
                                    f"{least:.4g} ({len(reference.scores)} reference digits)")


def anomaly_scores(logprob_nats: np.ndarray, complexity_bits: np.ndarray) -> np.ndarray:
    """(n,) log p(x) in nats and (n,) complexity in bits -> (n,) scores in bits, higher = more anomalous:
    -log2 p(x) - L(x), how many more bits the model spends on the image than PNG does."""
    return -np.asarray(logprob_nats, np.float64) / LN2 - np.asarray(complexity_bits, np.float64)


def p_values(scores: np.ndarray, reference: list[float]) -> np.ndarray:
    """(n,) scores -> (n,) p-values: the share of reference scores at least as high, counting the image itself
    among them, (1 + #{r >= s}) / (1 + N). Never 0, and for an image drawn like the reference ones
    P(p <= alpha) <= alpha (a conformal p-value)."""
    ref = np.asarray(reference, np.float64)  # ascending (the store checked)
    at_least = ref.size - np.searchsorted(ref, scores, side="left")
    return (1.0 + at_least) / (1.0 + ref.size)


def complexity_bits(images: np.ndarray) -> np.ndarray:
    """(n, H, W) uint8 -> (n,) the images' PNG lengths in bits, the complexity term of their scores."""
    return png_bits(images)


def anomaly_tests(logprob_nats: np.ndarray, complexity: np.ndarray, reference: AnomalyReference,
                  alpha: float) -> dict[str, np.ndarray]:
    """(n,) log p(x) in nats and complexity in bits -> (n,) arrays: score, p_value, likelihood_p_value, anomalous.

    Two tests, each at alpha / 2 (Bonferroni), so that at most alpha of the digits like the reference ones are
    flagged: the score's upper tail (`p_value`: the model explains the image worse than it explains digits of its
    complexity) and the likelihood's upper tail (`likelihood_p_value`: the image is likelier than digits ever are,
    as an all-black one is; Nalisnick et al., 2019, on typicality)."""
    scores = anomaly_scores(logprob_nats, complexity)
    p = p_values(scores, reference.scores)
    log2_p = np.asarray(logprob_nats, np.float64) / LN2
    p_likely = p_values(log2_p, [-b for b in reversed(reference.nll_bits)])  # the reference's log2 p(x), ascending
    return {"score": scores, "p_value": p, "likelihood_p_value": p_likely,
            "anomalous": np.minimum(p, p_likely) < alpha / 2}


def anomaly_results(out: dict[str, np.ndarray], complexity: np.ndarray, reference: AnomalyReference,
                    alpha: float) -> list[dict]:
    """The logprob graph's outputs for unlabelled images and their complexity -> one result per image."""
    likelihood = logprob_results(out, per_pixel=False)
    tests = anomaly_tests(np.array([r["logprob"] for r in likelihood]), complexity, reference, alpha)
    return [{"score": float(tests["score"][i]), **r, "complexity_bits": int(complexity[i]),
             "p_value": float(tests["p_value"][i]), "likelihood_p_value": float(tests["likelihood_p_value"][i]),
             "anomalous": bool(tests["anomalous"][i])} for i, r in enumerate(likelihood)]


def tensor_rules(mv: ModelVersion) -> TensorRules:
    """Images of whole pixel values 0..255 (the model indexes its 256-way output with them) and labels up to
    num_classes, "any digit", for every graph; vstack and hrow take up to the image's height in rows; the step
    graphs' new rows and columns lie inside the image."""
    height, width = input_size(mv)
    return TensorRules(ranges={"image": PIXEL_RANGE, "label": (0.0, float(any_digit(mv))),
                               "row": (0.0, float(height - 1)), "col": (0.0, float(width - 1))},
                       whole=frozenset({"image"}), max_axis=height, check=_steps_inside(mv))


def _steps_inside(mv: ModelVersion) -> Callable[[Mapping[str, np.ndarray]], str | None] | None:
    """vstep computes rows row .. row + n - 1 from a window of n + p rows, hstep columns col .. col + n - 1 from n
    vertical feature columns: those must be inside the image, or the graph would answer for positions that do
    not exist (its label maps clamped, not refused)."""
    if "vstep" not in mv.manifest.graphs:
        return None
    height, width = input_size(mv)
    context = declared_tensor(mv.manifest, "vstep", "vcache").shape[3]

    def check(arrays: Mapping[str, np.ndarray]) -> str | None:
        if "row" in arrays:  # vstep: `image` holds the p rows above the new ones, then the new ones
            return _inside(arrays["row"], arrays["image"].shape[2] - context, height, "row", "rows")
        if "col" in arrays:  # hstep: one column of vertical features per new column
            return _inside(arrays["col"], arrays["vfeats"].shape[-1], width, "col", "columns")
        return None

    return check


def _inside(start: np.ndarray, new: int, size: int, name: str, what: str) -> str | None:
    if start.size and (last := int(start.max()) + new - 1) >= size:
        return f"input '{name}': {new} new {what} from {int(start.max())} end at {last}, past the image's {size} {what}"
    return None
