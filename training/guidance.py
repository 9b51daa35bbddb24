"""How well PixelCNN samples follow their label, with and without classifier-free guidance, judged by the
project's digit classifier.

For each guidance weight w, `per_label` samples of every digit are drawn through the exported graphs with the
service's own sampler code (`service.sampler.sample_fast`, which the iteration-level sampler matches image for
image), from the same seeded uniforms for every w, so the weights are compared on common randomness. Reported per
w: the share of samples the judge labels as the digit they were asked for, the judge's mean probability of that
digit, and the class-wise Frechet distance (per digit, between the judge's features of the samples and of the
held-out digits of that label, averaged over digits; Heusel et al., 2017, per class).

    python -m training guidance                       # the shipped store's newest pixelcnn version, 50 per label
    python -m training guidance --version 1 --per-label 10 --weights 0 1 3

The judge is `runs/classifier.pt` (trained first, in about half a minute, when it is missing). The results go into
the judged version's manifest as `metrics.guidance` (the manifest is not among the checksummed files), so a version
carries the measurements its default weight was chosen from; `python -m training.report` renders them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from service.sampler import sample_fast
from service.store import read_manifest, write_manifest
from training import classifier as clf_lib
from training.data import Dataset
from training.evalutils import exported_graph, frechet_distance

WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0)
CHUNK = 100  # sequences sampled together (twice that many rows when guided)


@torch.no_grad()
def judge(clf: clf_lib.DigitClassifier, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 -> softmax probabilities (N, 10), features (N, F)."""
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    feats = clf.features(x)
    return torch.softmax(clf.head(feats), dim=1).numpy(), feats.numpy()


def evaluate_guidance(version_dir: Path, clf: clf_lib.DigitClassifier, heldout: Dataset, per_label: int = 50,
                      weights=WEIGHTS, temperature: float = 1.0, seed: int = 0, log=print) -> list[dict]:
    """One row per weight: {guidance, samples, recognised, confidence, classwise_frechet, seconds}."""
    vstack, hrow = exported_graph(version_dir, "vstack"), exported_graph(version_dir, "hrow")
    labels = np.repeat(np.arange(10), per_label)  # (N,) 0,0,...,1,1,...
    u = np.random.default_rng(seed).random((labels.size, 28 * 28))
    _, real_feats = judge(clf, heldout.images)
    rows = []
    for w in weights:
        t0 = time.time()
        images = np.concatenate([
            sample_fast(vstack, hrow, labels[i:i + CHUNK], u[i:i + CHUNK], temperature, w, any_label=10)
            for i in range(0, labels.size, CHUNK)])
        probs, feats = judge(clf, images)
        frechet = [frechet_distance(feats[labels == d], real_feats[heldout.labels == d]) for d in range(10)]
        rows.append({"guidance": float(w), "samples": int(labels.size),
                     "recognised": float((probs.argmax(1) == labels).mean()),
                     "confidence": float(probs[np.arange(labels.size), labels].mean()),
                     "classwise_frechet": float(np.mean(frechet)),
                     "per_label_recognised": [float((probs.argmax(1) == labels)[labels == d].mean())
                                              for d in range(10)],
                     "seconds": time.time() - t0})
        log(f"guidance {w:g}: {rows[-1]['recognised']:.1%} recognised, confidence {rows[-1]['confidence']:.3f}, "
            f"class-wise Frechet {rows[-1]['classwise_frechet']:.1f} ({rows[-1]['seconds']:.0f} s)")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| guidance w | recognised as their label | judge's mean confidence | class-wise Fréchet |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['guidance']:g} | {r['recognised']:.1%} | {r['confidence']:.3f} | "
                     f"{r['classwise_frechet']:.1f} |")
    return "\n".join(lines)


def record(version_dir: Path, report: dict) -> None:
    """Write `report` into the version's manifest as metrics.guidance."""
    manifest = read_manifest(version_dir)
    write_manifest(manifest.model_copy(update={"metrics": {**manifest.metrics, "guidance": report}}), version_dir)
