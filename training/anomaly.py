"""The PixelCNN's anomaly score, calibrated and judged, and its completions judged, on the held-out split only.

Calibration: the held-out digits at even positions are scored the way /v1/pixelcnn/anomaly scores
(service.families.pixelcnn: -log2 p(x) minus the image's PNG length, Serra et al., 2020), and their scores and
-log2 p(x) go into the version's manifest as its `anomaly` reference, which p-values are read against. The
export does this for every new version, so a version brings its own calibration (a held-out split too small for
a reference of MIN_ANOMALY_REFERENCE digits leaves the version without one, and its anomaly route answers 422).

Evaluation, on the held-out digits at odd positions (never part of the reference): the AUROC of the score, and of
raw -log p(x), against sets that are not MNIST digits: uniform noise, inverted digits, constant images of every
gray level, and harder ones made from real data (scikit-learn's own 8x8 digits upscaled, the digits shifted,
the digits with a band of rows erased); the share of each set flagged at the service's default alpha; and how
uniform the held-out digits' score p-values are. Completion: every held-out digit's top half given, the rest
drawn with the service's own sampler code, and the judge classifier asked whether the result is still the
original digit.

    python -m training anomaly                # the store's newest pixelcnn version
    python -m training anomaly --version 1

The judge is `runs/classifier.pt` (trained first, in about half a minute, when it is missing). The report goes
into the manifest as `metrics.anomaly` and `metrics.completion`; `python -m training.report` renders it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from scipy import stats
from skimage.transform import resize
from sklearn.datasets import load_digits

from service.families import pixelcnn
from service.sampler import sample_fast
from service.schemas import ANOMALY_ALPHA, PIXELCNN_GUIDANCE
from service.store import MIN_ANOMALY_REFERENCE, AnomalyReference, read_manifest, write_manifest
from training import classifier as clf_lib
from training.data import Dataset
from training.evalutils import auroc, exported_graph
from training.guidance import judge

log = logging.getLogger(__name__)
COMPLEXITY = "png-min-filter-zlib9"  # imaging.png_bits
CHUNK = 100
SHIFT = 4            # pixels
BAND = (11, 17)      # rows erased, the middle of the digit
COMPLETION_ROWS = 14


def halves(heldout: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(reference, evaluation): the held-out images at even and at odd positions."""
    return heldout.images[0::2], heldout.images[1::2]


def _any_digit(version_dir: Path) -> int:
    """The label that conditions on no digit: one past the digits (service.families.pixelcnn.any_digit)."""
    return int(read_manifest(version_dir).model["num_classes"])


def measure(version_dir: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 -> (log p(x) in nats, complexity in bits), as the service measures them (logprob.onnx,
    not conditioned on a digit)."""
    graph, label = exported_graph(version_dir, pixelcnn.LOGPROB), _any_digit(version_dir)
    logprob = np.array([r["logprob"] for x in np.array_split(images, max(1, len(images) // CHUNK))
                        for r in pixelcnn.logprob_results(
                            graph(pixelcnn.logprob_inputs(x, np.full(len(x), label, np.int64))), per_pixel=False)])
    return logprob, pixelcnn.complexity_bits(images)


def calibrate(version_dir: Path, heldout: Dataset) -> AnomalyReference | None:
    """Score the reference half of the held-out split and write it into the version's manifest; None (and no
    reference) when that half holds fewer than MIN_ANOMALY_REFERENCE digits."""
    reference, _ = halves(heldout)
    if len(reference) < MIN_ANOMALY_REFERENCE:
        log.warning("%s: no anomaly reference: half the held-out split is %d digits, fewer than %d", version_dir,
                    len(reference), MIN_ANOMALY_REFERENCE)
        return None
    logprob, complexity = measure(version_dir, reference)
    scores, nll = pixelcnn.anomaly_scores(logprob, complexity), -logprob / pixelcnn.LN2
    ref = AnomalyReference(complexity=COMPLEXITY, scores=sorted(float(s) for s in scores),
                           nll_bits=sorted(float(b) for b in nll),
                           source=f"held-out split (index % 10 == 9) at even positions: {len(reference)} digits")
    manifest = read_manifest(version_dir)
    write_manifest(manifest.model_copy(update={"anomaly": ref, "schema_version": 2}), version_dir)
    return ref


def _shifted(images: np.ndarray, k: int) -> np.ndarray:
    """Each image moved k pixels down, up, right or left in turn, what leaves the frame dropped."""
    out = np.zeros_like(images)
    h, w = images.shape[1:]
    for i, im in enumerate(images):
        dy, dx = ((k, 0), (-k, 0), (0, k), (0, -k))[i % 4]
        out[i, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            im[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def _sklearn_digits(n: int) -> np.ndarray:
    """The 8x8 digits scikit-learn ships (0..16, from another set of writers), bilinearly upscaled to the 20x20
    box MNIST centres its digits in, and padded to 28x28."""
    small = load_digits().images[:n] / 16.0                                   # (n, 8, 8) in 0..1
    big = np.stack([resize(d, (20, 20), order=1, anti_aliasing=False) for d in small])
    return np.pad(np.clip(np.rint(big * 255), 0, 255).astype(np.uint8), ((0, 0), (4, 4), (4, 4)))


def outlier_sets(digits: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Name -> (N, 28, 28) uint8 images that are not MNIST digits, the derived ones made from `digits`."""
    rng = np.random.default_rng(seed)
    erased = digits.copy()
    erased[:, BAND[0]:BAND[1]] = 0
    return {
        "uniform noise": rng.integers(0, 256, digits.shape, dtype=np.uint8),
        "inverted digits": 255 - digits,
        "constant images, every gray level": np.broadcast_to(
            np.arange(256, dtype=np.uint8)[:, None, None], (256, *digits.shape[1:])).copy(),
        "scikit-learn 8x8 digits, upscaled": _sklearn_digits(len(digits)),
        f"digits shifted {SHIFT} pixels": _shifted(digits, SHIFT),
        f"digits with rows {BAND[0]}-{BAND[1] - 1} erased": erased,
    }


def evaluate_anomaly(version_dir: Path, heldout: Dataset, reference: AnomalyReference, alpha: float = ANOMALY_ALPHA,
                     log=print) -> dict:
    """AUROC of the score and of -log p(x) per outlier set against the evaluation half, the share flagged at
    `alpha`, and the evaluation half's own p-values."""
    _, digits = halves(heldout)

    def tested(images: np.ndarray) -> dict[str, np.ndarray]:
        logprob, complexity = measure(version_dir, images)
        return {**pixelcnn.anomaly_tests(logprob, complexity, reference, alpha), "nll": -logprob / pixelcnn.LN2}

    inliers = tested(digits)
    rows = []
    for name, images in outlier_sets(digits).items():
        t = tested(images)
        rows.append({"set": name, "images": len(images), "auroc_score": auroc(inliers["score"], t["score"]),
                     "auroc_neg_logprob": auroc(inliers["nll"], t["nll"]), "flagged": float(t["anomalous"].mean())})
        log(f"{name}: AUROC score {rows[-1]['auroc_score']:.3f}, -log p(x) {rows[-1]['auroc_neg_logprob']:.3f}, "
            f"flagged {rows[-1]['flagged']:.1%}")
    black = tested(np.zeros((1, *digits.shape[1:]), np.uint8))
    return {
        "alpha": alpha, "reference_size": len(reference.scores), "evaluation_size": len(digits), "sets": rows,
        "heldout_flagged": float(inliers["anomalous"].mean()),
        "heldout_p_value_ks": float(stats.kstest(inliers["p_value"], "uniform").pvalue),
        "heldout_p_value_deciles": np.histogram(inliers["p_value"], bins=10, range=(0, 1))[0].tolist(),
        "all_black": {"score": float(black["score"][0]), "neg_logprob_bits": float(black["nll"][0]),
                      "p_value": float(black["p_value"][0]),
                      "likelihood_p_value": float(black["likelihood_p_value"][0]),
                      "anomalous": bool(black["anomalous"][0]),
                      "heldout_neg_logprob_below": float((inliers["nll"] < black["nll"][0]).mean())},
    }


def evaluate_completion(version_dir: Path, clf: clf_lib.DigitClassifier, heldout: Dataset,
                        known_rows: int = COMPLETION_ROWS, seed: int = 0, log=print) -> dict:
    """Every held-out digit with its top `known_rows` rows given, completed once per condition (the same
    uniforms for all): the share the judge labels as the original digit. Baselines: the digits themselves, and
    their top rows alone (the rest black)."""
    vstack, hrow = exported_graph(version_dir, "vstack"), exported_graph(version_dir, "hrow")
    any_digit = _any_digit(version_dir)
    images, labels = heldout.images, heldout.labels
    n, size = len(images), images.shape[1]
    known = np.zeros((n, size, size), bool)
    known[:, :known_rows] = True
    known = known.reshape(n, -1)
    u = np.random.default_rng(seed).random((n, size * size))
    rows = []

    def judged(what: str, drawn: np.ndarray, seconds: float = 0.0) -> None:
        probs, _ = judge(clf, drawn)
        rows.append({"condition": what, "recognised": float((probs.argmax(1) == labels).mean()),
                     "seconds": seconds})
        log(f"completion, {what}: {rows[-1]['recognised']:.1%} recognised as the original digit")

    judged("the held-out digits themselves", images)
    judged(f"their top {known_rows} rows alone, the rest black", np.where(known.reshape(images.shape), images, 0))
    for what, given_labels, w in (("completed, no label", np.full(n, any_digit), 0.0),
                                  ("completed given the digit, no guidance", labels, 0.0),
                                  (f"completed given the digit, guidance {PIXELCNN_GUIDANCE:g}", labels,
                                   PIXELCNN_GUIDANCE)):
        t0 = time.time()
        drawn = np.concatenate([
            sample_fast(vstack, hrow, given_labels[i:i + CHUNK].astype(np.int64), u[i:i + CHUNK], 1.0, w,
                        any_label=any_digit, given=(images[i:i + CHUNK], known[i:i + CHUNK]))
            for i in range(0, n, CHUNK)])
        judged(what, drawn, time.time() - t0)
    return {"known_rows": known_rows, "digits": n, "rows": rows}


def record(version_dir: Path, anomaly: dict, completion: dict) -> None:
    """Write the evaluations into the version's manifest as metrics.anomaly and metrics.completion."""
    manifest = read_manifest(version_dir)
    metrics = {**manifest.metrics, "anomaly": anomaly, "completion": completion}
    write_manifest(manifest.model_copy(update={"metrics": metrics}), version_dir)
