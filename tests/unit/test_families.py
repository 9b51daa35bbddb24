"""service.families: each family's rules read from the manifest (label space, geometry, /v2 value rules), the
request labels' checks, and the one tanh -> pixel conversion."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from service import families
from service.errors import reply
from service.families import gan, pixelcnn, vae
from service.families.shared import MNIST_CLASSES, InvalidField, from_tanh, label_array
from service.store import AttributeDirection, GraphSpec, TensorSpec

SERVICE = Path(__file__).resolve().parents[2] / "service"


def graph(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> GraphSpec:
    return GraphSpec(file="g.onnx", inputs=inputs, outputs=outputs)


def version(family: str, graphs: dict[str, GraphSpec], model: dict | None = None, attributes=None):
    """A stand-in ModelVersion: what the families read of one is its family and manifest."""
    manifest = SimpleNamespace(family=family, graphs=graphs, model=model or {}, attributes=attributes or {})
    return SimpleNamespace(family=family, manifest=manifest)


def t(name: str, dtype: str, *shape) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=list(shape))


# Models of another geometry and label space than the shipped ones: 20 rows of 12 pixels, 3 classes.
GAN = version("gan", {"generator": graph([t("z", "float32", None, 5), t("label", "int64", None)],
                                         [t("image", "float32", None, 1, 20, 12)])}, {"num_classes": 3})
PIXELCNN = version("pixelcnn", {
    "logprob": graph([t("image", "float32", None, 1, 20, 12), t("label", "int64", None)],
                     [t("log_probs", "float32", None, 20, 12)]),
    "vstack": graph([t("image", "float32", None, 1, None, 12), t("label", "int64", None)],
                    [t("vfeats", "float32", None, 2, 4, None, 12)])}, {"num_classes": 3})
VAE = version("vae", {
    "encoder": graph([t("image", "float32", None, 1, 20, 12)],
                     [t("mean", "float32", None, 4), t("logvar", "float32", None, 4)]),
    "decoder": graph([t("z", "float32", None, 4)], [t("loc", "float32", None, 1, 20, 12)])},
    attributes={"slant": AttributeDirection(description="", unit="deg", mean=0.0, std=1.0,
                                            direction=[1.0, 0.0, 0.0, 2.0])})


def test_geometry_and_label_space_come_from_the_manifest():
    assert gan.z_dim(GAN) == 5 and vae.latent_dim(VAE) == 4
    assert pixelcnn.input_size(PIXELCNN) == (20, 12) and vae.input_size(VAE) == (20, 12)
    assert pixelcnn.any_digit(PIXELCNN) == 3
    assert pixelcnn.labels(PIXELCNN, None, 2).tolist() == [3, 3]
    assert pixelcnn.uniforms(7, 2, pixelcnn.input_size(PIXELCNN)).shape == (2, 240)
    labels, inputs = gan.draw_for(GAN, 0, 500)
    assert set(labels.tolist()) == {0, 1, 2} and inputs["z"].shape == (500, 5) and inputs["label"] is labels


def test_v2_rules_per_family():
    assert families.tensor_rules(GAN) == families.shared.TensorRules(
        ranges={"label": (0.0, 2.0)}, whole=frozenset(), max_axis=20)
    rules = families.tensor_rules(PIXELCNN)
    assert rules.ranges == {"image": (0.0, 255.0), "label": (0.0, 3.0),   # 3: "any digit"
                            "row": (0.0, 19.0), "col": (0.0, 11.0)}       # the step graphs' position: 20 x 12 images
    assert rules.whole == {"image"} and rules.max_axis == 20
    rules = families.tensor_rules(VAE)
    assert rules.ranges == {"image": (0.0, 255.0)} and rules.whole == frozenset()


def test_a_manifest_without_num_classes_has_the_mnist_digits():
    bare = version("pixelcnn", PIXELCNN.manifest.graphs)
    assert pixelcnn.any_digit(bare) == MNIST_CLASSES
    assert families.tensor_rules(bare).ranges["label"] == (0.0, float(MNIST_CLASSES))


def test_labels_the_model_does_not_know_are_422_naming_them():
    assert label_array(None, 3, 9, 10).tolist() == [9, 9, 9]
    assert label_array(2, 3, 9, 10).tolist() == [2, 2, 2]
    assert label_array([0, 1, 2], 3, 9, 3).tolist() == [0, 1, 2]
    with pytest.raises(InvalidField) as info:
        pixelcnn.labels(PIXELCNN, [0, 2, 3], 3)   # 3 is "any digit": the model's own default, not a request's
    assert info.value.field == "labels[2]" and "0..2" in info.value.message
    assert reply(info.value)[:2] == (422, "invalid_request")
    with pytest.raises(InvalidField) as info:
        gan.draw_for(GAN, 0, 2, labels=5)
    assert info.value.field == "labels"


def test_vae_latents_and_edits_are_checked_against_the_model():
    assert vae.latents(VAE, [[0.0] * 4, [1.0] * 4]).shape == (2, 4)
    with pytest.raises(InvalidField) as info:
        vae.latents(VAE, [[0.0] * 4, [1.0] * 16])
    assert info.value.field == "latents[1]" and "expected 4 floats, got 16" in info.value.message
    np.testing.assert_allclose(vae.edit_shift(VAE, {"slant": 0.5}), [0.5, 0.0, 0.0, 1.0])
    with pytest.raises(InvalidField) as info:
        vae.edit_shift(VAE, {"thickness": 1.0})
    assert info.value.field == "edits.thickness" and "['slant']" in info.value.message


def test_vae_path_ends_at_both_latents():
    a, b = np.array([1.0, 0.0, 0.0, 0.0]), np.array([0.0, 2.0, 0.0, 0.0])
    for method in ("slerp", "lerp"):
        z = vae.path(a, b, 5, method)
        assert z.shape == (5, 4)
        np.testing.assert_allclose(z[[0, -1]], [a, b], atol=1e-12)
    np.testing.assert_allclose(vae.path(a, b, 3, "lerp")[1], [0.5, 1.0, 0.0, 0.0])


def test_logprob_results_sum_nats_and_convert_to_bits_per_dim():
    lp = np.full((2, 20, 12), -0.5, np.float32)
    lp[1] = -1.0
    results = pixelcnn.logprob_results({"log_probs": lp}, per_pixel=False)
    assert [r["logprob"] for r in results] == [-120.0, -240.0]
    assert results[0]["bits_per_dim"] == pytest.approx(0.5 / np.log(2.0))
    assert "per_pixel" not in results[0]
    maps = pixelcnn.logprob_results({"log_probs": lp}, per_pixel=True)
    assert np.array(maps[1]["per_pixel"]).shape == (20, 12)


def test_decoder_and_generator_outputs_become_the_same_pixels():
    tanh = np.linspace(-1.0, 1.0, 2 * 20 * 12, dtype=np.float32).reshape(2, 1, 20, 12)
    assert (gan.pixels(tanh) == vae.decoded({"loc": tanh})).all()
    assert (gan.pixels(tanh) == from_tanh(tanh[:, 0])).all()
    assert gan.pixels(tanh).shape == (2, 20, 12)


def test_the_tanh_to_pixel_conversion_is_written_once():
    sources = {p: p.read_text() for p in SERVICE.rglob("*.py")}
    found = [p.relative_to(SERVICE) for p, text in sources.items() if re.search(r"127\.5", text)]
    assert found == [Path("families/shared.py")] and sources[SERVICE / "families/shared.py"].count("127.5") == 1
