"""Export trained networks to ONNX, check parity with PyTorch, and write a validated store version.

Each graph is one forward pass: no loops, no random ops. Sampling noise and sampling loops live on the host.
Inputs and outputs are named, the batch axis is dynamic (PixelCNN's step graphs also take a dynamic height,
so the host can feed only the rows a step needs). Images enter as pixel values 0..255; the VAE decoder's `loc`
and the GAN's `image` leave in the networks' own -1..1 units (scaling them by 127.5 in the graph would only
amplify float error past the parity tolerance); the host maps them to pixels.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn

from service.store import (
    GraphSpec,
    Manifest,
    file_entry,
    session_tensor_specs,
    validate_version,
    write_manifest,
)
from training import gan as gan_lib
from training import pixelcnn as pcnn_lib
from training import vae as vae_lib

log = logging.getLogger(__name__)
PARITY_TOLERANCE = 1e-4



@dataclass
class GraphExport:
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic: dict[str, tuple[int, ...]]   # input name -> its dynamic axes (0 = batch, 2 = height)
    # input name -> axis -> a torch.export dimension, for axes the table of export_onnx does not describe (the
    # step graphs' windows, whose length is the new positions plus the cached ones: a derived dimension)
    shapes: dict[str, dict[int, Any]] | None = None


# --- per-family graph wrappers --------------------------------------------------------------------

class _PixelCNNLogProb(nn.Module):
    def __init__(self, m: pcnn_lib.PixelCNN):
        super().__init__()
        self.m = m

    def forward(self, image, label):          # (B, 1, 28, 28), (B,) -> (B, 28, 28) nats
        return pcnn_lib.log_prob_per_pixel(self.m(image, label), image)


class _PixelCNNVStack(nn.Module):
    def __init__(self, m: pcnn_lib.PixelCNN):
        super().__init__()
        self.m = m

    def forward(self, image, label):          # (B, 1, H, 28), (B,) -> (B, L, 2C, H, 28)
        return self.m.vertical_features(image, label)


class _PixelCNNVStep(nn.Module):
    def __init__(self, m: pcnn_lib.PixelCNN):
        super().__init__()
        self.m = m

    def forward(self, image, vcache, label, row):  # (B, 1, p+n, 28), (B, L-1, C, p, 28), (B,), (B,)
        return self.m.vertical_step(image, vcache, label, row)   # (B, L, 2C, n, 28), (B, L-1, C, n, 28)


class _PixelCNNHStep(nn.Module):
    def __init__(self, m: pcnn_lib.PixelCNN):
        super().__init__()
        self.m = m

    def forward(self, image, hcache, vfeats, col):  # (B, 1, 1, p+n), (B, L-1, C, 1, p), (B, L, 2C, 1, n), (B,)
        return self.m.horizontal_step(image, hcache, vfeats, col)  # (B, 256, 1, n), (B, L-1, C, 1, n)


class _PixelCNNHRow(nn.Module):
    def __init__(self, m: pcnn_lib.PixelCNN):
        super().__init__()
        self.m = m

    def forward(self, image, vfeats):         # (B, 1, H, 28), (B, L, 2C, H, 28) -> (B, 256, H, 28)
        return self.m.horizontal(image, vfeats)




def pixelcnn_graphs(m: pcnn_lib.PixelCNN, steps: bool = True) -> dict[str, GraphExport]:
    """The graphs of a PixelCNN version: logprob, the row-cached sampler's vstack and hrow, and with `steps` the
    activation-cached sampler's vstep and hstep (versions exported before them have only the first three)."""
    m = m.eval()
    img = torch.randint(0, 256, (2, 1, 28, 28)).float()
    lab = torch.tensor([3, m.cfg.num_classes])
    vf = m.vertical_features(img, lab)
    return {**(pixelcnn_step_graphs(m) if steps else {}),
        "logprob": GraphExport(_PixelCNNLogProb(m), (img, lab), ["image", "label"], ["log_probs"],
                               {"image": (0,), "label": (0,)}),
        "vstack": GraphExport(_PixelCNNVStack(m), (img, lab), ["image", "label"], ["vfeats"],
                              {"image": (0, 2), "label": (0,)}),
        "hrow": GraphExport(_PixelCNNHRow(m), (img, vf), ["image", "vfeats"], ["logits"],
                            {"image": (0, 2), "vfeats": (0, 3)}),
    }


def pixelcnn_step_graphs(m: pcnn_lib.PixelCNN) -> dict[str, GraphExport]:
    """vstep and hstep: n new rows (columns) at a time, n dynamic, windows of p + n. The example's rows and
    columns are the largest the parity check may draw (it draws 0 .. the example's maximum), so that its new
    rows stay inside the image."""
    m = m.eval()
    cfg, p = m.cfg, m.cfg.kernel // 2
    s, depth, c, n = cfg.image_size, cfg.n_layers - 1, cfg.channels, 3
    new = torch.export.Dim("new", min=1, max=s)
    batch = torch.export.Dim("batch", min=1, max=4096)
    lab = torch.tensor([3, cfg.num_classes])
    at = torch.tensor([s - n, 1])
    rows, vcache = torch.randint(0, 256, (2, 1, p + n, s)).float(), torch.randn(2, depth, c, p, s)
    pixels, hcache = torch.randint(0, 256, (2, 1, 1, p + n)).float(), torch.randn(2, depth, c, 1, p)
    vfeats = torch.randn(2, depth + 1, 2 * c, 1, n)
    return {
        "vstep": GraphExport(_PixelCNNVStep(m), (rows, vcache, lab, at), ["image", "vcache", "label", "row"],
                             ["vfeats", "vnew"], {}, {"image": {0: batch, 2: new + p}, "vcache": {0: batch},
                                                      "label": {0: batch}, "row": {0: batch}}),
        "hstep": GraphExport(_PixelCNNHStep(m), (pixels, hcache, vfeats, at), ["image", "hcache", "vfeats", "col"],
                             ["logits", "hnew"], {}, {"image": {0: batch, 3: new + p}, "hcache": {0: batch},
                                                      "vfeats": {0: batch, 4: new}, "col": {0: batch}}),
    }


def vae_graphs(m: vae_lib.VAE) -> dict[str, GraphExport]:
    m = m.eval()
    img = torch.randint(0, 256, (2, 1, 28, 28)).float()
    z = torch.randn(2, m.cfg.latent_dim)
    return {
        "encoder": GraphExport(m.encoder, (img,), ["image"], ["mean", "logvar"], {"image": (0,)}),
        "decoder": GraphExport(m.decoder, (z,), ["z"], ["loc", "log_scale"], {"z": (0,)}),
    }


def gan_graphs(g: gan_lib.Generator, z_dim: int) -> dict[str, GraphExport]:
    g = g.eval()
    return {"generator": GraphExport(g, (torch.randn(2, z_dim), torch.tensor([1, 7])),
                                     ["z", "label"], ["image"], {"z": (0,), "label": (0,)})}


# --- export, parity, store -----------------------------------------------------------------------

def export_onnx(spec: GraphExport, path: Path) -> None:
    dims = {0: torch.export.Dim("batch", min=1, max=4096), 2: torch.export.Dim("height", min=1, max=28),
            3: torch.export.Dim("height", min=1, max=28)}
    params = list(__import__("inspect").signature(spec.module.forward).parameters)
    dynamic_shapes = {p: (spec.shapes or {}).get(n) or {ax: dims[ax] for ax in spec.dynamic.get(n, ())}
                      for p, n in zip(params, spec.input_names, strict=True)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(spec.module, spec.example, str(path), input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_shapes=dynamic_shapes, dynamo=True,
                          external_data=False, verbose=False, optimize=True)


def parity(spec: GraphExport, sess: ort.InferenceSession, batch: int = 5) -> float:
    """Max abs difference between PyTorch and ONNX Runtime on fresh inputs of another batch size."""
    inputs = []
    for t in spec.example:  # new values, new batch size: proves the batch axis really is dynamic
        if t.dtype == torch.int64:
            inputs.append(torch.randint(0, int(t.max()) + 1, (batch,) + tuple(t.shape[1:])))
        elif t.dim() == 4 and t.shape[1] == 1:
            inputs.append(torch.randint(0, 256, (batch,) + tuple(t.shape[1:])).float())
        else:
            inputs.append(torch.randn((batch,) + tuple(t.shape[1:])))
    with torch.no_grad():
        ref = spec.module(*inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = sess.run(spec.output_names, {n: t.numpy() for n, t in zip(spec.input_names, inputs, strict=True)})
    return max(float(np.abs(r.numpy() - g).max()) for r, g in zip(ref, got, strict=True))


def write_version(store: Path, name: str, family: str, version: int, graphs: dict[str, GraphExport],
                  calibrate: Callable[[Path], Any] | None = None,
                  **manifest_fields: Any) -> tuple[Path, dict[str, float]]:
    """Export every graph, check parity, write manifest.json and validate, all in a hidden folder beside the
    target (`<store>/<name>/.<version>-*`, which the store's scan skips), then publish it (see publish()). A crash
    leaves at most that hidden folder behind. `calibrate(version_dir)`, when given, measures what needs the
    exported graphs and adds it to the manifest there, before the version is published."""
    final = store / name / str(version)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=final.parent))
    try:
        diffs = _stage_version(tmp, name, family, version, graphs, manifest_fields)
        if calibrate is not None:
            calibrate(tmp / name / str(version))
            validate_version(tmp / name / str(version))
        publish(tmp / name / str(version), final)
    finally:  # a failed export (parity, validation) leaves nothing behind; a replaced version goes with it
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s (parity %s)", final, {k: f"{v:.1e}" for k, v in diffs.items()})
    return final, diffs


def publish(staged: Path, final: Path) -> None:
    """Put the complete version folder `staged` at `final`, on the same file system, so that a reader of `final`
    finds the old complete version or the new complete one, never a part of either: one rename when `final` does
    not exist, else one exchange of the two folders (the old version is left inside `staged`'s parent).

    Everything staged is flushed to disk first, so that not even a crash of the machine can leave a version under
    its visible name whose files were never written."""
    _fsync_tree(staged)
    try:
        os.rename(staged, final)  # refuses (ENOTEMPTY, EEXIST) to replace a folder that holds a version
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        exchange(staged, final)
    _fsync(final.parent)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def exchange(a: Path, b: Path) -> None:
    """Swap two folders in one step: renameat2(RENAME_EXCHANGE) on Linux. Where the C library or the file system
    lacks it, b is first moved aside beside a (its parent is hidden): b is then missing for a moment, never
    partial. Either way b ends up holding what a held, and the old b stays under a's parent."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(a), None, str(b))
    aside = a.with_name(a.name + "-replaced")
    os.rename(b, aside)
    try:
        os.rename(a, b)
    except OSError:
        os.rename(aside, b)  # put the old version back: the caller deletes a's parent, and aside with it
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` (itself included) to disk."""
    for sub, _, files in os.walk(folder):
        for f in files:
            _fsync(Path(sub) / f)
        _fsync(Path(sub))


def _stage_version(tmp: Path, name: str, family: str, version: int, graphs: dict[str, GraphExport],
                   manifest_fields: dict) -> dict[str, float]:
    """Export, check parity, write the manifest and validate, all in `tmp/<name>/<version>/` (the store's layout,
    so validation sees exactly what the service will)."""
    vdir = tmp / name / str(version)
    vdir.mkdir(parents=True)
    files, gspecs, diffs = {}, {}, {}
    for gname, spec in graphs.items():
        fname = f"{gname}.onnx"
        export_onnx(spec, vdir / fname)
        sess = ort.InferenceSession(str(vdir / fname), providers=["CPUExecutionProvider"])
        diffs[gname] = parity(spec, sess)
        if diffs[gname] > PARITY_TOLERANCE:
            raise RuntimeError(f"{name}/{gname}: ONNX parity {diffs[gname]:.2e} exceeds {PARITY_TOLERANCE}")
        ins, outs = session_tensor_specs(sess)
        files[fname] = file_entry(vdir / fname)
        gspecs[gname] = GraphSpec(file=fname, inputs=ins, outputs=outs)
    manifest_fields.setdefault("created", dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat())
    manifest_fields.setdefault("metrics", {})["onnx_parity_max_abs_diff"] = diffs
    manifest = Manifest(name=name, family=family, version=version, files=files, graphs=gspecs, **manifest_fields)
    write_manifest(manifest, vdir)
    validate_version(vdir)
    return diffs
