"""service/runtime.py pieces that need no GPU: bucket sizes, the fixed-shape (padded) predict, and the registry
refusing one version that cannot serve while the others do (and what readiness then requires)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from service import memory
from service.runtime import PaddedPredict, SlicedPredict, bucket_sizes
from service.sampler import session_fn


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


# ----------------------------------------------------------------------------- memory: slices, warm-up, release

SHIPPED = Path(__file__).resolve().parents[2] / "models_store"


class RowsSession(FakeSession):
    """y = 2 x + label for x of shape (n, 1, rows, 4), recording every input shape."""

    def run(self, names, feeds):
        self.shapes.append(feeds["x"].shape)
        return [feeds["x"] * 2 + feeds["label"][:, None, None, None]]


def _rows_feeds(n: int, rows: int) -> dict:
    return {"x": np.arange(n * rows * 4, dtype=np.float32).reshape(n, 1, rows, 4), "label": np.arange(n)}


@pytest.mark.parametrize(("n", "rows", "calls"), [(8, 28, [8]), (9, 28, [8, 1]), (20, 28, [8, 8, 4]),
                                                   (64, 1, [64]), (300, 1, [224, 76]), (30, 14, [16, 14])])
def test_sliced_predict_runs_at_most_its_images_worth_per_call(n, rows, calls):
    sess = RowsSession()
    predict = SlicedPredict(session_fn(sess), images=8, image_size=28, rows=("x", 2))
    feeds = _rows_feeds(n, rows)
    out = predict(feeds)
    np.testing.assert_array_equal(out["y"], feeds["x"] * 2 + feeds["label"][:, None, None, None])
    assert [shape[0] for shape in sess.shapes] == calls


def test_sliced_predict_without_a_rows_axis_counts_items():
    sess = FakeSession()
    predict = SlicedPredict(session_fn(sess), images=3, image_size=28)
    x = np.arange(14, dtype=np.float32).reshape(7, 2)
    out = predict({"x": x, "label": np.arange(7)})
    np.testing.assert_array_equal(out["y"], x * 2 + np.arange(7)[:, None])
    assert [s[0] for s in sess.shapes] == [3, 3, 1]


def test_a_graph_whose_output_is_not_batch_major_cannot_be_sliced():
    def summed(feeds):
        return {"total": feeds["x"].sum(axis=0, keepdims=True)}

    with pytest.raises(ValueError, match="first axis is not the batch"):
        SlicedPredict(summed, images=2, image_size=28)({"x": np.ones((5, 3), np.float32)})


def _shipped_version(name: str, version: int, **overrides):
    from concurrent.futures import ThreadPoolExecutor

    from service.metrics import Metrics
    from service.runtime import ModelVersion, session_factory
    from service.settings import Settings
    from service.store import validate_version

    settings = Settings(providers="cpu", intra_op_threads=1, **overrides)
    lv = validate_version(SHIPPED / name / str(version), session_factory(settings))
    return ModelVersion(lv, settings, ThreadPoolExecutor(1), Metrics())


def test_shipped_pixelcnn_graphs_give_the_same_outputs_in_slices():
    """Slicing changes which items share a call, never an output: each image's computation is its own."""
    mv = _shipped_version("pixelcnn", 2)
    assert isinstance(mv.predict["logprob"], SlicedPredict) and isinstance(mv.predict["vstack"], SlicedPredict)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 11, 20)
    feeds = {"logprob": {"image": images, "label": labels},
             "vstack": {"image": np.ascontiguousarray(images[:, :, :14]), "label": labels}}
    for graph, f in feeds.items():
        sliced, whole = mv.predict[graph](f), session_fn(mv.loaded.sessions[graph])(f)
        assert mv.predict[graph].per_call(f) < len(labels)
        for k in whole:
            np.testing.assert_allclose(sliced[k], whole[k], rtol=1e-5, atol=1e-5)


def test_slicing_follows_the_setting_and_the_provider():
    mv = _shipped_version("pixelcnn", 2, max_call_images={"logprob": 4})
    assert isinstance(mv.predict["logprob"], SlicedPredict) and mv.predict["logprob"].images == 4
    assert not isinstance(mv.predict["vstack"], SlicedPredict)
    gan = _shipped_version("gan", 1)
    assert not isinstance(gan.predict["generator"], SlicedPredict)   # not named: whole batches
    cuda, _ = _gan_version()
    assert not isinstance(cuda.predict["generator"], SlicedPredict)  # on CUDA, never


def test_warm_up_runs_the_configured_batch_sizes_capped_at_the_max():
    assert _shipped_version("vae", 1).warm_sizes("encoder") == [1]
    mv = _shipped_version("vae", 1, warmup_batch_sizes=[1, 8, 1000])
    assert mv.warm_sizes("encoder") == [1, 8, mv.batching.max_batch_size]
    mv.warmup()
    assert set(mv.warmup_costs) == {"encoder", "decoder"}
    report = mv.load_report()
    assert report["graphs"]["encoder"]["warmup"]["seconds"] > 0
    assert report["cold_start_s"] >= report["warmup"]["seconds"]


@pytest.mark.parametrize("arena", ["shared", "session", "off"])
def test_releasing_memory_gives_back_what_a_large_batch_grew(arena):
    """A logprob batch of 48 in one call grows ONNX Runtime's arena by over 150 MiB (3.6 MiB an image), which it
    keeps; after release_memory() the process's RSS is back within 60 MiB of where it was before the call. (With
    the arena off the C allocator's mmap gives the block back as the call ends.)"""
    import asyncio

    from service.metrics import Metrics
    from service.runtime import Registry
    from service.settings import Settings

    reg = Registry(Settings(store_path=SHIPPED, providers="cpu", intra_op_threads=1, worker_threads=1,
                            ort_arena=arena, max_call_images={}, version_policy={"pixelcnn": {"specific": [2]}},
                            required_models=["pixelcnn"]), Metrics())
    mv = reg.build([SHIPPED / "pixelcnn" / "2"], {})[0]  # which releases once, after warm-up
    assert reg.releases == 1
    reg.release_memory([mv])
    before = memory.rss_bytes()
    out = mv.predict["logprob"]({"image": np.zeros((48, 1, 28, 28), np.float32), "label": np.zeros(48, np.int64)})
    grown = memory.rss_bytes()
    del out
    reg.release_memory([mv])
    after = memory.rss_bytes()
    asyncio.run(reg.stop())
    if arena != "off":
        assert grown - before > 100 * 2**20, f"the call grew RSS by {(grown - before) >> 20} MiB only"
    assert after - before < 60 * 2**20, f"{(after - before) >> 20} MiB of {(grown - before) >> 20} stayed"
    assert reg.releases == 3
