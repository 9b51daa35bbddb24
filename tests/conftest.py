"""Shared fixtures. The expensive one, `tiny_store`, trains the tiny preset of every family on a few hundred
real digits and exports a complete model store once per test session (the integration tier's pipeline)."""

from __future__ import annotations

import logging
import shutil
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


def copy_version(store: Path, model: str, src: int, dst: int, truncate: str | None = None) -> None:
    """<model>/<src> copied as version <dst>, its manifest saying so; `truncate` cuts that file to 1000 bytes."""
    from service.store import read_manifest, write_manifest

    staged = store / model / f".{dst}-staging"   # hidden while it is written: a poll must not see half a version
    shutil.copytree(store / model / str(src), staged)
    write_manifest(read_manifest(staged).model_copy(update={"version": dst}), staged)
    if truncate:
        (staged / truncate).write_bytes((staged / truncate).read_bytes()[:1000])
    staged.rename(store / model / str(dst))


def one_thread_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # the test machine is shared
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def tiny_pixelcnn_version(tmp_path_factory):
    """(torch model, LoadedVersion) of a tiny random PixelCNN (with label maps) exported with all five graphs to a
    temporary store and loaded back.

    Torch runs on one thread meanwhile: on a busy 2-core machine its thread barriers can make the per-pixel
    torch sampler 100x slower.
    """
    from service.store import validate_version
    from training import pixelcnn as pcnn
    from training.export import pixelcnn_graphs, write_version

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        cfg = pcnn.PixelCNNConfig(channels=8, n_layers=3, head_channels=16, label_maps=2)
        model = pcnn.PixelCNN(cfg).eval()
        store = tmp_path_factory.mktemp("pixelcnn-store")
        path, _ = write_version(store, "tiny-pixelcnn", "pixelcnn", 1, pixelcnn_graphs(model), model=cfg.to_dict())
        yield model, validate_version(path, one_thread_session)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_pixelcnn_onnx(tiny_pixelcnn_version):
    """(torch model, vstack fn, hrow fn) of the tiny PixelCNN."""
    from service.sampler import session_fn

    model, loaded = tiny_pixelcnn_version
    return model, session_fn(loaded.sessions["vstack"]), session_fn(loaded.sessions["hrow"])


@pytest.fixture(scope="session")
def tiny_pixelcnn_steps(tiny_pixelcnn_version):
    """(vstep fn, hstep fn, CacheGeometry) of the tiny PixelCNN: its activation-cached step graphs."""
    from service.sampler import CacheGeometry, session_fn
    from service.store import declared_tensor

    _, loaded = tiny_pixelcnn_version
    cache = declared_tensor(loaded.manifest, "vstep", "vcache").shape
    return session_fn(loaded.sessions["vstep"]), session_fn(loaded.sessions["hstep"]), CacheGeometry(*cache[1:4])


class SamplingGraphs:
    """What an IterationSampler steps on, either way (`kind`: "rows" on vstack/hrow, "cached" on vstep/hstep), and
    `reference`, the (vstack, hrow) of sample_fast: both ways must draw its images."""

    def __init__(self, kind: str, reference: tuple, row_graph, pixel_graph, geometry=None, side: int = 28):
        self.kind, self.reference = kind, reference
        self.row_graph, self.pixel_graph, self.geometry, self.side = row_graph, pixel_graph, geometry, side

    def steps(self, row_graph, pixel_graph):
        """Steps on these graphs (the harness's recording wrappers of row_graph and pixel_graph)."""
        from service.sampler import CachedSteps, RowSteps

        if self.kind == "rows":
            return RowSteps(row_graph, pixel_graph)
        return CachedSteps(row_graph, pixel_graph, self.geometry, self.side)


@pytest.fixture(scope="session", params=["rows", "cached"])
def sampling_graphs(request, tiny_pixelcnn_onnx, tiny_pixelcnn_steps) -> SamplingGraphs:
    """The tiny PixelCNN's sampling graphs, each way in turn."""
    reference = tiny_pixelcnn_onnx[1:]
    if request.param == "rows":
        return SamplingGraphs("rows", reference, *reference)
    return SamplingGraphs("cached", reference, *tiny_pixelcnn_steps)


# The README's measured memory figures, the one place they are written down: the memory test holds the server to
# them (within 25%) and the Kubernetes test sizes the pod's requests and limits by them.
MEMORY_ROWS = {"after_warmup": "after warm-up (ready)", "load_peak": "load run, peak",
               "load_end": "at the load run's last answer", "after_load": "1 s after the load run",
               "after_idle": "after the idle release"}


def documented_memory_mib() -> dict[str, float]:
    """{"after_warmup", "load_peak", "load_end", "after_load", "after_idle"} -> MiB, from the first table of the
    README's "## Memory and cold start" section, whose rows start with MEMORY_ROWS' labels."""
    import re

    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Memory and cold start\n", 1)[1].split("\n## ", 1)[0]
    found = {}
    for key, label in MEMORY_ROWS.items():
        m = re.search(rf"^\| {re.escape(label)}[^|]* \| ([\d,.]+) \|", section, re.M)
        assert m, f"README, Memory and cold start: no row starting with {label!r}"
        found[key] = float(m.group(1).replace(",", ""))
    return found
