"""Shared fixtures. The expensive one, `tiny_store`, trains the tiny preset of every family on a few hundred
real digits and exports a complete model store once per test session (the integration tier's pipeline)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training.data import Dataset, load_dataset, split

REPO = Path(__file__).resolve().parents[1]


def subset(ds: Dataset, n: int) -> Dataset:
    """The first n images of every class in turn, so every label is present."""
    per_class = n // 10
    idx = np.concatenate([np.flatnonzero(ds.labels == k)[:per_class] for k in range(10)])
    return Dataset(ds.images[idx], ds.labels[idx], f"{ds.source} (subset of {len(idx)})")


@pytest.fixture(scope="session")
def digits() -> tuple[Dataset, Dataset, Dataset]:
    ds = load_dataset()
    train, heldout = split(ds)
    return ds, subset(train, 300), subset(heldout, 400)  # 400: an anomaly reference of 200


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, digits) -> Path:
    from training.__main__ import export_all, train_families
    from training.config import preset

    ds, train, heldout = digits
    root = tmp_path_factory.mktemp("tiny")
    runs, store = root / "runs", root / "store"
    cfg = preset("tiny")
    t0 = time.time()
    train_families(("classifier", "vae", "gan", "pixelcnn"), cfg, train, runs)
    t1 = time.time()
    report = export_all(cfg, ds, train, heldout, runs, store, 1, copy_images=False)
    logging.getLogger(__name__).info("tiny store: trained in %.1f s, evaluated and exported in %.1f s",
                                     t1 - t0, time.time() - t1)
    (root / "report.json").write_text(str(report))
    return store


def one_thread_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # the test machine is shared
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def tiny_pixelcnn_onnx(tmp_path_factory):
    """(torch model, vstack fn, hrow fn) of a tiny random PixelCNN exported to a temporary store and loaded back.

    Torch runs on one thread meanwhile: on a busy 2-core machine its thread barriers can make the per-pixel
    torch sampler 100x slower.
    """
    from service.sampler import session_fn
    from service.store import validate_version
    from training import pixelcnn as pcnn
    from training.export import pixelcnn_graphs, write_version

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        cfg = pcnn.PixelCNNConfig(channels=8, n_layers=3, head_channels=16)
        model = pcnn.PixelCNN(cfg).eval()
        store = tmp_path_factory.mktemp("pixelcnn-store")
        path, _ = write_version(store, "tiny-pixelcnn", "pixelcnn", 1, pixelcnn_graphs(model), model=cfg.to_dict())
        loaded = validate_version(path, one_thread_session)
        yield model, session_fn(loaded.sessions["vstack"]), session_fn(loaded.sessions["hrow"])
    finally:
        torch.set_num_threads(threads)


# The README's measured memory figures, the one place they are written down: the memory test holds the server to
# them (within 25%) and the Kubernetes test sizes the pod's requests and limits by them.
MEMORY_ROWS = {"after_warmup": "after warm-up (ready)", "load_peak": "load run, peak",
               "after_load": "right after the load run", "after_idle": "after the idle release"}


def documented_memory_mib() -> dict[str, float]:
    """{"after_warmup", "load_peak", "after_load", "after_idle"} -> MiB, from the first table of the README's
    "## Memory and cold start" section, whose rows start with MEMORY_ROWS' labels."""
    import re

    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Memory and cold start\n", 1)[1].split("\n## ", 1)[0]
    found = {}
    for key, label in MEMORY_ROWS.items():
        m = re.search(rf"^\| {re.escape(label)}[^|]* \| ([\d,.]+) \|", section, re.M)
        assert m, f"README, Memory and cold start: no row starting with {label!r}"
        found[key] = float(m.group(1).replace(",", ""))
    return found
