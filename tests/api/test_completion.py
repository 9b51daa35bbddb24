"""POST /v1/pixelcnn/complete on the tiny store, in-process: known pixels come back bit for bit, the rest is what
the single-batch reference draws for the same seed; bad regions are a 422 naming the field; it streams like sample."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from genserve_client.client import _EventParser
from service.sampler import sample_fast, session_fn
from service.schemas import PIXELCNN_GUIDANCE
from tests.api.conftest import make_client, png_array, wait_ready

COMPLETE = "/v1/pixelcnn/complete"


@pytest.fixture(scope="module")
def client(tiny_store):
    with make_client(tiny_store, sse_progress_interval_s=0.01) as c:
        wait_ready(c)
        yield c


def reference(store, image: np.ndarray, known: np.ndarray, labels: list[int], seed: int) -> np.ndarray:
    graphs = [session_fn(ort.InferenceSession(str(store / "pixelcnn" / "1" / f"{g}.onnx"),
                                              providers=["CPUExecutionProvider"])) for g in ("vstack", "hrow")]
    n = len(labels)
    u = np.random.default_rng(seed).random((n, 28 * 28))
    given = (np.repeat(image[None], n, axis=0), np.repeat(known.reshape(1, -1), n, axis=0))
    return sample_fast(*graphs, np.array(labels), u, 1.0, PIXELCNN_GUIDANCE, any_label=10, given=given)


def test_known_rows_are_kept_and_the_rest_is_the_reference(client, tiny_store, digit_images):
    image = digit_images[0]
    r = client.post(COMPLETE, json={"image": image.tolist(), "known_rows": 14, "n": 2, "seed": 9, "labels": [3, 3]})
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.stack([png_array(b) for b in body["images"]])
    assert body["seed"] == 9 and body["labels"] == [3, 3]
    np.testing.assert_array_equal(got[:, :14], np.repeat(image[None, :14], 2, axis=0))  # bit for bit
    known = np.zeros((28, 28), bool)
    known[:14] = True
    np.testing.assert_array_equal(got, reference(tiny_store, image, known, [3, 3], 9))
    assert not np.array_equal(got[0], got[1])  # two completions, two draws


def test_a_mask_keeps_its_pixels_wherever_they_are(client, tiny_store, digit_images):
    image = digit_images[1]
    mask = np.zeros((28, 28), int)
    mask[:10] = 1
    mask[:, :5] = 1  # the left band too, below unknown pixels
    r = client.post(COMPLETE, json={"image": image.tolist(), "mask": mask.tolist(), "seed": 2, "labels": 7})
    assert r.status_code == 200, r.text
    got = png_array(r.json()["images"][0])
    np.testing.assert_array_equal(got[mask == 1], image[mask == 1])
    np.testing.assert_array_equal(got[None], reference(tiny_store, image, mask.astype(bool), [7], 2))


@pytest.mark.parametrize("change, field", [
    ({"known_rows": None}, "known_rows"),                                  # neither region
    ({"mask": [[1] * 28] * 28}, "known_rows"),                              # both
    ({"known_rows": None, "mask": [[1] * 28] * 28}, "mask"),                # nothing left to draw
    ({"known_rows": None, "mask": [[2] * 28] * 28}, "mask"),                # not 0/1
    ({"known_rows": None, "mask": [[0] * 27] * 28}, "mask"),                # not 28x28
    ({"known_rows": 28}, "known_rows"),
    ({"known_rows": 0}, "known_rows"),
    ({"n": 17}, "n"),
    ({"image": [[0] * 27] * 28}, "image"),
])
def test_bad_completions_are_a_422_naming_the_field(client, digit_images, change, field):
    body = {"image": digit_images[0].tolist(), "known_rows": 14, **change}
    r = client.post(COMPLETE, json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 422, r.text
    assert field in [f["field"] for f in r.json()["error"]["fields"]], r.text


def test_a_completion_streams_its_progress_then_the_plain_answer(client, digit_images):
    body = {"image": digit_images[2].tolist(), "known_rows": 20, "n": 1, "seed": 5, "labels": 1}
    plain = client.post(COMPLETE, json=body).json()
    parser, events = _EventParser(), []
    with client.stream("POST", COMPLETE, json=body, headers={"accept": "text/event-stream"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if (event := parser.feed(line)) is not None:
                events.append((event[0], json.loads(event[1])))
    names = [name for name, _ in events]
    assert names[-1] == "result" and set(names[:-1]) == {"progress"}
    done = [data["pixels_done"] for name, data in events if name == "progress"]
    assert all(d == 0 or d >= 20 * 28 for d in done)  # queued, or under way with the given rows counted as done
    assert events[-1][1] == plain
