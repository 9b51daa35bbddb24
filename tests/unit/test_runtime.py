"""service/runtime.py pieces that need no GPU: bucket sizes, the fixed-shape (padded) predict, and the registry
refusing one version that cannot serve while the others do (and what readiness then requires)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from service.runtime import PaddedPredict, bucket_sizes


class _Output:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeSession:
    """y = 2 x + label, recording every input shape it is run with."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def get_outputs(self):
        return [_Output("y")]

    def run(self, names, feeds):
        self.shapes.append(feeds["x"].shape)
        return [feeds["x"] * 2 + feeds["label"][:, None]]


@pytest.mark.parametrize(("buckets", "mbs", "expected"), [([1, 8], 64, [1, 8, 64]), ([], 64, [64]),
                                                          ([1, 8, 64, 128], 64, [1, 8, 64]), ([0, 8], 4, [4])])
def test_bucket_sizes_end_at_the_max_batch_size(buckets, mbs, expected):
    assert bucket_sizes(buckets, mbs) == expected


def test_each_session_sees_only_its_bucket_and_padding_is_cut_off():
    sessions = {1: FakeSession(), 8: FakeSession(), 64: FakeSession()}
    predict = PaddedPredict(sessions)
    for n in (1, 3, 8, 9, 64, 2):
        x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
        label = np.arange(n, dtype=np.int64)
        out = predict({"x": x, "label": label})
        np.testing.assert_array_equal(out["y"], x * 2 + label[:, None])  # padding never leaks into results
    for bucket, sess in sessions.items():
        assert sess.shapes and all(shape == (bucket, 2) for shape in sess.shapes)
    assert len(sessions[8].shapes) == 3 and len(sessions[64].shapes) == 2


def test_a_batch_over_the_largest_bucket_is_refused():
    with pytest.raises(ValueError, match="largest bucket"):
        PaddedPredict({1: FakeSession(), 4: FakeSession()})({"x": np.zeros((5, 2), np.float32),
                                                             "label": np.zeros(5, np.int64)})


def _gan_version(make_session=None):
    """The shipped GAN, loaded on the CPU but labelled as running on CUDA, so the CUDA wiring runs here."""
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from service.metrics import Metrics
    from service.runtime import CUDA, ModelVersion, session_factory
    from service.settings import Settings
    from service.store import validate_version

    settings = Settings(providers="cpu", cuda_buckets=[1, 8])
    cpu_session = session_factory(settings)
    lv = validate_version(Path(__file__).resolve().parents[2] / "models_store" / "gan" / "1", cpu_session)
    lv.providers = [CUDA, *lv.providers]
    return ModelVersion(lv, settings, ThreadPoolExecutor(1), Metrics(), make_session or cpu_session), lv


def test_cuda_versions_get_a_session_per_bucket_with_the_same_results():
    mv, lv = _gan_version()
    predict = mv.predict["generator"]
    assert isinstance(predict, PaddedPredict) and predict.buckets == [1, 8, mv.batching.max_batch_size]
    assert mv.warm_sizes("generator") == predict.buckets
    feeds = {"z": np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32),
             "label": np.array([1, 2, 3], np.int64)}
    direct = lv.sessions["generator"].run(None, feeds)[0]
    np.testing.assert_allclose(predict(feeds)["image"], direct, atol=1e-6)


def test_a_bucket_session_that_fails_to_open_falls_back_to_one_session(caplog):
    def full_gpu(path):
        raise RuntimeError("CUDA out of memory")

    mv, _ = _gan_version(make_session=full_gpu)
    assert not isinstance(mv.predict["generator"], PaddedPredict)
    assert "no bucket sessions" in caplog.text


# ----------------------------------------------------------------------------- one version failing alone


@pytest.fixture
def store(tiny_store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(tiny_store, dst)
    return dst


def _started(store, **overrides):
    """A registry loaded and started on `store` (CPU, no warm-up unless asked), then stopped: (registry, whether
    it was fully ready while started)."""
    import asyncio

    from service.metrics import Metrics
    from service.runtime import Registry
    from service.settings import Settings

    reg = Registry(Settings(store_path=store, providers="cpu", worker_threads=1, **{"warmup": False, **overrides}),
                   Metrics())
    reg.load()

    async def run():
        await reg.start()
        fully_ready = reg.fully_ready
        await reg.stop()
        return fully_ready
    return reg, asyncio.run(run())


def test_a_version_that_cannot_be_set_up_is_refused_and_the_others_serve(store, monkeypatch, caplog):
    from service import runtime

    real = runtime.ModelVersion

    def model_version(lv, *args, **kwargs):
        if lv.manifest.name == "gan":
            raise RuntimeError("no memory left for its batchers")
        return real(lv, *args, **kwargs)
    monkeypatch.setattr(runtime, "ModelVersion", model_version)
    reg, fully_ready = _started(store)
    assert sorted(reg.models) == ["pixelcnn", "vae"] and not fully_ready
    assert reg.refused == {str(store / "gan/1"): ("cannot be set up for serving: RuntimeError: no memory left for its "
                                                  "batchers",)}
    assert reg.missing == {"gan": (f"{store / 'gan/1'}: cannot be set up for serving: RuntimeError: no memory left "
                                   "for its batchers",)}
    assert sum(str(store / "gan/1") in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR) == 2
    # one line refusing the version, one saying the service is not ready and why


def test_a_version_that_fails_warm_up_is_withdrawn_and_the_others_serve(store, monkeypatch):
    from service import runtime

    real = runtime.ModelVersion.warmup

    def warmup(self):
        if self.name == "vae":
            raise RuntimeError("the graph loads but cannot run")
        return real(self)
    monkeypatch.setattr(runtime.ModelVersion, "warmup", warmup)
    reg, fully_ready = _started(store, warmup=True)
    assert sorted(reg.models) == ["gan", "pixelcnn"] and not fully_ready
    assert list(reg.refused) == [str(store / "vae/1")] and list(reg.missing) == ["vae"]
    # genserve_model_info names what serves, not what was built and then refused
    info = {s.labels["model"] for m in reg.metrics.registry.collect() if m.name == "genserve_model_info"
            for s in m.samples}
    assert info == {"gan", "pixelcnn"}


def test_required_models_default_to_every_model_folder_and_the_setting_narrows_them(store):
    (store / "vae/1/decoder.onnx").write_bytes(b"truncated")
    (store / "empty").mkdir()
    reg, fully_ready = _started(store)
    assert reg.required == ("empty", "gan", "pixelcnn", "vae") and not fully_ready
    assert reg.missing["empty"] == (f"{store / 'empty'}: holds no version folder",)
    (why,) = reg.missing["vae"]
    assert why.startswith(f"{store / 'vae/1'}: file 'decoder.onnx' sha256 is")

    reg, fully_ready = _started(store, required_models=["gan", "pixelcnn"])
    assert fully_ready and reg.missing == {} and sorted(reg.models) == ["gan", "pixelcnn"]

    reg, fully_ready = _started(store, required_models=["gan", "nothere"])
    assert not fully_ready and reg.missing == {"nothere": (f"{store / 'nothere'}: no such folder",)}

    reg, fully_ready = _started(store, required_models=[])
    assert fully_ready


def test_warm_up_sizes_the_step_graphs_rows_by_the_manifests_image_size(store):
    import json

    manifest = json.loads((store / "pixelcnn/1/manifest.json").read_text())
    rows = {g: t["shape"] for g, spec in manifest["graphs"].items() for t in spec["inputs"] if t["name"] == "image"}
    assert rows["vstack"][2] is None and rows["logprob"][2] == manifest["model"]["image_size"]
    reg, _ = _started(store, warmup=True)
    mv = reg.get("pixelcnn")
    assert mv.zeros("vstack", 3)["image"].shape == (3, 1, manifest["model"]["image_size"], rows["vstack"][3])
    del manifest["model"]["image_size"]
    (store / "pixelcnn/1/manifest.json").write_text(json.dumps(manifest))  # not a checksummed file
    reg, fully_ready = _started(store, warmup=True)
    assert sorted(reg.models) == ["gan", "vae"] and not fully_ready
    (why,) = reg.refused[str(store / "pixelcnn/1")]
    assert why.startswith("failed to warm up: ValueError: manifest.model.image_size is None"), why


def test_what_readers_see_is_read_only(store):
    reg, _ = _started(store)
    with pytest.raises(TypeError):
        reg.models["gan"][2] = reg.models["gan"][1]  # type: ignore[index]
    with pytest.raises(TypeError):
        reg.refused["elsewhere"] = ("made up",)  # type: ignore[index]
    with pytest.raises(AttributeError):
        reg.snapshot.ready = False  # type: ignore[misc]
    assert sorted(reg.models) == ["gan", "pixelcnn", "vae"] and reg.refused == {}
