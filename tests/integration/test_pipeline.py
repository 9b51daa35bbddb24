"""The integration tier: a tiny training run on real digits, ONNX export, parity, causality of the graphs."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.store import StoreError, load_store, read_manifest
from training.export import PARITY_TOLERANCE


def _session(store, path):
    return ort.InferenceSession(str(store / path), providers=["CPUExecutionProvider"])


def test_manifests_carry_config_metrics_and_checksums(tiny_store):
    for name, needed in {"pixelcnn": ["heldout_bits_per_dim", "codec_bits_per_dim"],
                         "vae": ["heldout_neg_elbo_bits_per_dim", "heldout_iwae_bits_per_dim", "attribute_edits"],
                         "gan": ["conditional_accuracy", "unconditional_class_histogram",
                                 "frechet_distance_samples"]}.items():
        m = read_manifest(tiny_store / name / "1")
        assert all(k in m.metrics for k in needed), (name, sorted(m.metrics))
        assert m.training["config"]["seed"] == 0 and m.model and m.dataset["heldout"] == 400
        assert all(v <= PARITY_TOLERANCE for v in m.metrics["onnx_parity_max_abs_diff"].values())
        for g in m.graphs.values():
            assert g.inputs[0].shape[0] is None                      # dynamic batch axis
    pixelcnn = read_manifest(tiny_store / "pixelcnn/1")   # scored at export: the even half of the 400 held out
    assert pixelcnn.anomaly is not None and len(pixelcnn.anomaly.scores) == 200 and pixelcnn.schema_version == 2
    assert read_manifest(tiny_store / "vae/1").anomaly is None
    vae = read_manifest(tiny_store / "vae/1")
    assert set(vae.attributes) == {"thickness", "slant"}
    assert len(vae.attributes["slant"].direction) == vae.model["latent_dim"]
    # the IWAE bound is never looser than the ELBO by more than noise
    assert vae.metrics["heldout_iwae_bits_per_dim"] <= vae.metrics["heldout_neg_elbo_bits_per_dim"] + 0.01


@pytest.mark.parametrize("t", [0, 13, 27, 28, 400, 783])
def test_exported_pixelcnn_is_causal(tiny_store, t):
    """Changing pixel t changes no logits at positions <= t (vstack + hrow graphs on the full image), and no
    log-probabilities at positions < t (the logprob graph scores pixel t itself)."""
    vstack, hrow = _session(tiny_store, "pixelcnn/1/vstack.onnx"), _session(tiny_store, "pixelcnn/1/hrow.onnx")
    logprob = _session(tiny_store, "pixelcnn/1/logprob.onnx")
    rng = np.random.default_rng(t)
    x = rng.integers(0, 256, (1, 1, 28, 28)).astype(np.float32)
    x2 = x.copy()
    x2[0, 0, t // 28, t % 28] = 255 - x2[0, 0, t // 28, t % 28]
    label = np.array([10])

    def logits(img):
        (vf,) = vstack.run(None, {"image": img, "label": label})
        return hrow.run(None, {"image": img, "vfeats": vf})[0]      # (1, 256, 28, 28)

    d_logits = np.abs(logits(x2) - logits(x)).max(axis=1).ravel()
    d_lp = np.abs(logprob.run(None, {"image": x2, "label": label})[0]
                  - logprob.run(None, {"image": x, "label": label})[0]).ravel()
    assert d_logits[: t + 1].max() == 0 and d_lp[:t].max(initial=0) == 0
    assert d_lp[t] > 0                                                # the changed pixel's own score moves


def test_onnx_runs_at_other_batch_sizes_than_exported(tiny_store):
    sess = _session(tiny_store, "gan/1/generator.onnx")
    for b in (1, 7, 64):
        (img,) = sess.run(None, {"z": np.zeros((b, sess.get_inputs()[0].shape[1]), np.float32),
                                 "label": np.arange(b) % 10})
        assert img.shape == (b, 1, 28, 28) and -1 <= img.min() and img.max() <= 1     # tanh units


def _tiny_gan(seed: int):
    from training import export as ex
    from training.gan import GANConfig, Generator

    torch.manual_seed(seed)
    cfg = GANConfig(z_dim=4, g_channels=8)
    return ex.gan_graphs(Generator(cfg).eval(), cfg.z_dim)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def exported_gan(tmp_path_factory) -> Path:
    """A store holding gan/1, exported once for this module's tests to copy."""
    from training import export as ex

    store = tmp_path_factory.mktemp("export") / "store"
    ex.write_version(store, "gan", "gan", 1, _tiny_gan(0))
    return store


@pytest.fixture
def gan_store(exported_gan, tmp_path) -> Path:
    shutil.copytree(exported_gan, tmp_path / "store")
    return tmp_path / "store"


def _fail_parity(ex, monkeypatch):  # after the first graph is written
    monkeypatch.setattr(ex, "PARITY_TOLERANCE", -1.0)


def _fail_validation(ex, monkeypatch):  # after every file and the manifest are written
    def refuse(vdir):
        raise StoreError(vdir, ["refused for the test"])
    monkeypatch.setattr(ex, "validate_version", refuse)


@pytest.mark.parametrize("fail", [_fail_parity, _fail_validation])
@pytest.mark.parametrize("crash", [False, True], ids=["failed", "crashed"])
def test_an_export_that_fails_midway_leaves_the_old_version_and_nothing_visible(gan_store, monkeypatch, fail, crash):
    from training import export as ex

    old = _snapshot(gan_store / "gan/1")
    fail(ex, monkeypatch)
    if crash:  # the process dies: no clean-up runs
        monkeypatch.setattr(ex.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises((RuntimeError, StoreError)):
        ex.write_version(gan_store, "gan", "gan", 1, _tiny_gan(1))
    with pytest.raises((RuntimeError, StoreError)):
        ex.write_version(gan_store, "gan", "gan", 2, _tiny_gan(1))  # a version that did not exist yet
    names = sorted(p.name for p in (gan_store / "gan").iterdir())
    assert [n for n in names if not n.startswith(".")] == ["1"] and (len(names) > 1) == crash
    assert _snapshot(gan_store / "gan/1") == old
    models, refused = load_store(gan_store)
    assert sorted(models["gan"]) == [1] and refused == {}


@pytest.mark.parametrize("swap", ["exchange", "move aside"])
def test_a_version_exported_again_replaces_the_old_one_whole(gan_store, monkeypatch, swap):
    from training import export as ex

    if swap == "move aside":  # a C library without renameat2
        monkeypatch.setattr(ex.ctypes, "CDLL", lambda *a, **k: types.SimpleNamespace())
    old = _snapshot(gan_store / "gan/1")
    ex.write_version(gan_store, "gan", "gan", 1, _tiny_gan(1))
    new = _snapshot(gan_store / "gan/1")
    assert new.keys() == old.keys() and new["generator.onnx"] != old["generator.onnx"]
    assert [p.name for p in (gan_store / "gan").iterdir()] == ["1"]  # the old version went with the staging folder
    models, refused = load_store(gan_store)
    assert sorted(models["gan"]) == [1] and refused == {}


def test_the_move_aside_swap_puts_the_old_version_back_when_the_new_one_cannot_move_in(tmp_path, monkeypatch):
    from training import export as ex

    monkeypatch.setattr(ex.ctypes, "CDLL", lambda *a, **k: types.SimpleNamespace())  # no renameat2
    staged, final = tmp_path / ".1-x/gan/1", tmp_path / "gan/1"
    for folder, tag in ((staged, "new"), (final, "old")):
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(tag)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new version moving in
            raise OSError(28, "No space left on device")
        real_rename(src, dst)
    monkeypatch.setattr(ex.os, "rename", rename)
    with pytest.raises(OSError):
        ex.exchange(staged, final)
    assert (final / "manifest.json").read_text() == "old"


@pytest.mark.parametrize("swap", ["exchange", "move aside"])
def test_a_reader_never_sees_a_partial_version_while_one_is_published(tmp_path, monkeypatch, swap):
    from training import export as ex

    if swap == "move aside":
        monkeypatch.setattr(ex.ctypes, "CDLL", lambda *a, **k: types.SimpleNamespace())
    files = [f"graph{i}.onnx" for i in range(4)] + ["manifest.json"]
    final = tmp_path / "gan/1"

    def stage(tag: str) -> Path:
        staged = Path(tempfile.mkdtemp(prefix=".1-", dir=final.parent)) / "gan/1"
        staged.mkdir(parents=True)
        for f in files:
            (staged / f).write_text(tag)
        return staged

    final.parent.mkdir()
    ex.publish(stage("0"), final)
    seen, missing, failures, stop = [], [0], [], threading.Event()

    def read():  # the folder opened once, then read through it: one version, whichever the name held then
        try:
            read_until_stopped()
        except Exception as e:
            failures.append(e)

    def read_until_stopped():
        while not stop.is_set():
            try:
                fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                missing[0] += 1
                continue
            try:
                names = sorted(os.listdir(fd))
                tags = set()
                for name in names:
                    with open(os.open(name, os.O_RDONLY, dir_fd=fd)) as f:
                        tags.add(f.read())
                seen.append((names, tags))
            finally:
                os.close(fd)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, 100):  # replaced versions are kept until the reader stops: one may be open in it
            ex.publish(stage(str(i)), final)
    finally:
        stop.set()
        reader.join()
    assert failures == [] and len(seen) > 50
    assert all(names == sorted(files) and len(tags) == 1 for names, tags in seen)  # one whole version each time
    assert (final / "manifest.json").read_text() == "99"
    if swap == "exchange":
        assert missing[0] == 0  # never even absent
