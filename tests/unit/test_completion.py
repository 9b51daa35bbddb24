"""Completion in PixelCNN sampling: given pixels kept bit for bit, the rest drawn conditioned on what precedes them;
the iteration-level sampler matches the single-batch reference, which matches the obvious definition."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.sampler import IterationSampler, sample_fast, sample_pixel
from tests.conftest import SamplingGraphs
from tests.unit.test_sampler import PIXELS, Harness, make_request, wait_until

ANY = 10


@pytest.fixture(scope="module")
def reference(tiny_pixelcnn_onnx):
    """(vstack, hrow): the graphs of the single-batch references."""
    return tiny_pixelcnn_onnx[1:]


@pytest.fixture
def graphs(sampling_graphs: SamplingGraphs) -> SamplingGraphs:
    """What the iteration-level sampler steps on, each way in turn."""
    return sampling_graphs


def given_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28)).astype(np.uint8)


def top_rows(n: int, rows: int) -> np.ndarray:
    known = np.zeros((n, PIXELS), bool)
    known[:, : rows * 28] = True
    return known


def naive_completion(vstack, hrow, labels, u, images, known) -> np.ndarray:
    """Every pixel through the whole image; a known pixel is kept, an unknown one drawn."""
    x = np.where(known.reshape(-1, 28, 28), images, 0).astype(np.float32)[:, None]
    for t in range(PIXELS):
        r, c = divmod(t, 28)
        logits = hrow({"image": x, "vfeats": vstack({"image": x, "label": labels})["vfeats"]})["logits"][:, :, r, c]
        drawn = sample_pixel(logits, u[:, t], 1.0)
        x[:, 0, r, c] = np.where(known[:, t], x[:, 0, r, c], drawn)
    return x[:, 0].astype(np.uint8)


def test_the_reference_keeps_given_pixels_and_matches_the_definition(reference):
    labels, u = make_request(21, [4, ANY])
    images = given_images(2, 1)
    known = top_rows(2, 14)
    known[1, 500:510] = True  # and a few pixels after unknown ones
    got = sample_fast(*reference, labels, u, given=(images, known))
    np.testing.assert_array_equal(got, naive_completion(*reference, labels, u, images, known))
    np.testing.assert_array_equal(got.reshape(2, -1)[known], images.reshape(2, -1)[known])
    assert not np.array_equal(got, sample_fast(*reference, labels, u))  # what was given mattered


def test_completions_share_steps_with_samples_and_match_the_reference(graphs):
    (la, ua), (lb, ub), (lc, uc) = make_request(1, [3, 7]), make_request(2, [5]), make_request(3, [1])
    images = given_images(2, 2)
    prefix = (images, top_rows(2, 14))  # starts at row 14: skips the 392 given pixels
    mask = np.zeros((1, PIXELS), bool)
    mask[0, : 5 * 28 + 10] = True  # starts mid-row (5, 10): its vfeats row is computed at once
    mask[0, 600:620] = True
    mid_row = (given_images(1, 3), mask)
    want_a = sample_fast(*graphs.reference, la, ua, given=prefix)
    want_b = sample_fast(*graphs.reference, lb, ub, 1.0, 2.0, any_label=ANY, given=mid_row)  # guided too
    want_c = sample_fast(*graphs.reference, lc, uc)
    h = Harness(graphs)

    async def scenario(sampler: IterationSampler) -> None:
        c = asyncio.create_task(sampler.sample(lc, uc))
        await wait_until(lambda: sampler.steps >= 30)
        a = asyncio.create_task(sampler.sample(la, ua, given=prefix))
        b = asyncio.create_task(sampler.sample(lb, ub, 1.0, guidance=2.0, given=mid_row))
        ticket_progress = None
        await wait_until(lambda: sampler.active == 4)
        for ticket, _ in sampler._slots:  # a completion's given prefix counts as done
            if ticket.given is not None and ticket.labels.size == 2:
                ticket_progress = ticket.progress()
        assert ticket_progress is not None and ticket_progress[0] >= 2 * 14 * 28
        np.testing.assert_array_equal(await a, want_a)
        np.testing.assert_array_equal(await b, want_b)
        np.testing.assert_array_equal(await c, want_c)

    h.run(scenario)
    # the plain sample took 784 steps; the completions joined it rather than running after it
    assert len(h.pixels.sizes) < PIXELS + PIXELS - 14 * 28


@pytest.mark.parametrize("given, match", [
    ((np.zeros((1, 28, 28), np.uint8), np.ones((1, PIXELS), bool)), "unknown"),
    ((np.zeros((1, 27, 28), np.uint8), np.zeros((1, PIXELS), bool)), "given images"),
    ((np.zeros((1, 28, 28), np.float32), np.zeros((1, PIXELS), bool)), "given images"),
    ((np.zeros((1, 28, 28), np.uint8), np.zeros((1, PIXELS), np.uint8)), "given mask"),
])
def test_bad_given_pixels_are_refused(graphs, given, match):
    labels, u = make_request(5, [1])
    with pytest.raises(ValueError, match=match):
        sample_fast(*graphs.reference, labels, u, given=given)
    h = Harness(graphs)

    async def scenario(sampler: IterationSampler) -> None:
        with pytest.raises(ValueError, match=match):
            sampler.enqueue(labels, u, given=given)

    h.run(scenario)
    assert h.pixels.sizes == []
