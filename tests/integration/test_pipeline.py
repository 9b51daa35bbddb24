"""The integration tier: a tiny training run on real digits, ONNX export, parity, causality of the graphs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from service.store import read_manifest
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
        assert m.training["config"]["seed"] == 0 and m.model and m.dataset["heldout"] == 100
        assert all(v <= PARITY_TOLERANCE for v in m.metrics["onnx_parity_max_abs_diff"].values())
        for g in m.graphs.values():
            assert g.inputs[0].shape[0] is None                      # dynamic batch axis
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


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    from training import export as ex
    from training.gan import GANConfig, Generator

    monkeypatch.setattr(ex, "PARITY_TOLERANCE", -1.0)            # every graph now "fails" parity
    cfg = GANConfig(z_dim=4, g_channels=8)
    with pytest.raises(RuntimeError, match="parity"):
        ex.write_version(tmp_path, "gan", "gan", 1, ex.gan_graphs(Generator(cfg).eval(), cfg.z_dim))
    assert [p.name for p in (tmp_path / "gan").iterdir()] == []
