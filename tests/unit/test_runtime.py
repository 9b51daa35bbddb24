"""service/runtime.py pieces that need no GPU: bucket sizes and the fixed-shape (padded) predict."""

from __future__ import annotations

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
