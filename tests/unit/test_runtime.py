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
