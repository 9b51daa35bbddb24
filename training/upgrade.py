"""A stored PixelCNN version re-exported with the activation-cached step graphs (vstep, hstep), from the weights
its own graphs hold: no checkpoint and no retraining needed, and the new version samples exactly what the old one
does, only faster.

The weights are the ONNX initializers of the version's `logprob` graph, which computes the whole network: the
exporter keeps each parameter under its module path (`m.layers.0.v_conv.weight`), except the per-label maps,
which it may rename; those are found by their shape, which nothing else has. The last layer's vertical label terms
feed only that layer's vertical output, which no graph uses, so they are not in any graph and are zero here.
Before anything is written, the rebuilt network must reproduce the version's logprob, vstack and hrow graphs on
held-out digits; its held-out evaluation, anomaly reference and judged figures are then the old version's own.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from service.store import read_manifest
from training import export as ex
from training import pixelcnn as pcnn_lib
from training.evalutils import exported_graph

log = logging.getLogger(__name__)
PREFIX = "m."  # the export wrappers hold the network as `self.m`


def pixelcnn_from_version(version_dir: Path) -> pcnn_lib.PixelCNN:
    """The torch PixelCNN whose weights a stored version's logprob graph holds."""
    manifest = read_manifest(version_dir)
    model = pcnn_lib.PixelCNN(pcnn_lib.PixelCNNConfig(**manifest.model)).eval()
    graph = onnx.load(str(version_dir / manifest.graphs["logprob"].file))
    weights = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    state, unused = {}, f"layers.{model.cfg.n_layers - 1}.v_"
    for key, param in model.state_dict().items():
        if PREFIX + key in weights:
            array = weights[PREFIX + key]
        elif key == "label_map":
            same = [a for name, a in weights.items() if not name.startswith(PREFIX) and a.shape == param.shape]
            if len(same) != 1:
                raise ValueError(f"{version_dir}: {len(same)} unnamed initializers of the label maps' shape "
                                 f"{tuple(param.shape)}, expected exactly one")
            array = same[0]
        elif key.startswith(unused):
            array = np.zeros(tuple(param.shape), np.float32)
        else:
            raise ValueError(f"{version_dir}: the logprob graph holds no weight {key}")
        if tuple(array.shape) != tuple(param.shape):
            raise ValueError(f"{version_dir}: {key} has shape {array.shape}, the config says {tuple(param.shape)}")
        state[key] = torch.from_numpy(np.array(array, np.float32))
    model.load_state_dict(state)
    return model


@torch.no_grad()
def reproduction_error(model: pcnn_lib.PixelCNN, version_dir: Path, images: np.ndarray,
                       labels: np.ndarray) -> dict[str, float]:
    """Max abs difference between the rebuilt network and the version's own graphs, per graph, on these images
    (n, H, W) uint8 with labels (n,)."""
    x = torch.from_numpy(images[:, None].astype(np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    vfeats = model.vertical_features(x, y)
    ours = {"logprob": pcnn_lib.log_prob_per_pixel(model(x, y), x), "vstack": vfeats,
            "hrow": model.horizontal(x, vfeats)}
    feeds = {"logprob": {"image": x.numpy(), "label": y.numpy()}, "vstack": {"image": x.numpy(), "label": y.numpy()},
             "hrow": {"image": x.numpy(), "vfeats": vfeats.numpy()}}
    errors = {}
    for name, want in ours.items():
        got = next(iter(exported_graph(version_dir, name)(feeds[name]).values()))
        errors[name] = float(np.abs(got - want.numpy()).max())
    return errors


def add_step_graphs(store: Path, source: int, version: int, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write pixelcnn/<version>: pixelcnn/<source>'s network with all five graphs, checked against <source>'s
    graphs on `images` first. Returns the new version's folder."""
    source_dir = store / "pixelcnn" / str(source)
    if (store / "pixelcnn" / str(version)).exists():
        raise FileExistsError(f"{store / 'pixelcnn' / str(version)} exists: choose a version number not in use")
    old = read_manifest(source_dir)
    model = pixelcnn_from_version(source_dir)
    errors = reproduction_error(model, source_dir, images, labels)
    if max(errors.values()) > ex.PARITY_TOLERANCE:
        raise RuntimeError(f"the network rebuilt from {source_dir} does not reproduce its graphs: {errors}")
    log.info("rebuilt pixelcnn %d from its graphs (max abs difference %s)", source,
             {k: f"{v:.1e}" for k, v in errors.items()})
    metrics = {k: v for k, v in old.metrics.items() if k != "onnx_parity_max_abs_diff"}
    metrics["weights_from"] = {"version": source, "max_abs_diff_to_its_graphs": errors, "digits": len(images)}
    final, _ = ex.write_version(
        store, "pixelcnn", "pixelcnn", version, ex.pixelcnn_graphs(model, steps=True),
        schema_version=old.schema_version, description=old.description + "; activation-cached step graphs",
        model=old.model, dataset=old.dataset, training=old.training, metrics=metrics, anomaly=old.anomaly,
        batching=old.batching)
    return final
