"""Classifier-free guidance in PixelCNN sampling: the formula, the single-batch reference, and the iteration-level
sampler serving guided and unguided sequences in the same graph calls, image for image like the references."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.sampler import IterationSampler, guided_logits, sample_fast, sample_pixel
from tests.conftest import SamplingGraphs
from tests.unit.test_sampler import PIXELS, Harness, make_request, wait_until

ANY = 10  # the tiny model's "any digit" label


@pytest.fixture(scope="module")
def reference(tiny_pixelcnn_onnx):
    """(vstack, hrow): the graphs of the single-batch references."""
    return tiny_pixelcnn_onnx[1:]


@pytest.fixture
def graphs(sampling_graphs: SamplingGraphs) -> SamplingGraphs:
    """What the iteration-level sampler steps on, each way in turn."""
    return sampling_graphs


def naive_guided(vstack, hrow, labels: np.ndarray, u: np.ndarray, w: float) -> np.ndarray:
    """Guided sampling the slow, obvious way: both whole images through both graphs for every pixel."""
    n = labels.size
    x = np.zeros((n, 1, 28, 28), np.float32)
    for t in range(PIXELS):
        r, c = divmod(t, 28)
        logits = []
        for y in (labels, np.full(n, ANY)):
            vfeats = vstack({"image": x, "label": y})["vfeats"]
            logits.append(hrow({"image": x, "vfeats": vfeats})["logits"][:, :, r, c])
        mixed = (1 + w) * logits[0].astype(np.float64) - w * logits[1].astype(np.float64)
        x[:, 0, r, c] = sample_pixel(mixed, u[:, t], 1.0)
    return x[:, 0].astype(np.uint8)


def test_guided_logits_is_the_classifier_free_mix() -> None:
    rng = np.random.default_rng(0)
    cond, uncond = rng.normal(size=(3, 256)).astype(np.float32), rng.normal(size=(3, 256)).astype(np.float32)
    w = np.array([0.0, 1.0, 2.5])
    mixed = guided_logits(cond, uncond, w)
    assert mixed.dtype == np.float64
    np.testing.assert_array_equal(mixed[0], cond[0].astype(np.float64))  # w = 0: the conditional logits exactly
    c, un = cond.astype(np.float64), uncond.astype(np.float64)
    np.testing.assert_allclose(mixed[1], 2.0 * c[1] - un[1], rtol=1e-12)
    np.testing.assert_allclose(mixed[2], 3.5 * c[2] - 2.5 * un[2], rtol=1e-12)


def test_sample_fast_with_guidance_matches_the_naive_definition(reference) -> None:
    labels, u = make_request(11, [2, 7])
    want = naive_guided(*reference, labels, u, 2.0)
    np.testing.assert_array_equal(sample_fast(*reference, labels, u, 1.0, 2.0, any_label=ANY), want)
    assert not np.array_equal(want, sample_fast(*reference, labels, u))  # guidance changed the images
    with pytest.raises(ValueError, match="any_label"):
        sample_fast(*reference, labels, u, 1.0, 2.0)
    with pytest.raises(ValueError, match="guidance"):
        sample_fast(*reference, labels, u, 1.0, -1.0, any_label=ANY)


def test_guided_and_unguided_requests_share_every_step_and_match_the_references(graphs) -> None:
    (la, ua), (lb, ub), (lc, uc) = make_request(1, [3, ANY]), make_request(2, [7]), make_request(3, [5])
    want_a = sample_fast(*graphs.reference, la, ua, 1.0, 1.5, any_label=ANY)  # the digit guided, "any digit" not
    want_any = sample_fast(*graphs.reference, la[1:], ua[1:])  # "any digit": nothing to guide towards
    want_b = sample_fast(*graphs.reference, lb, ub, 0.8)  # unguided
    want_c = sample_fast(*graphs.reference, lc, uc, 1.0, 4.0, any_label=ANY)  # guided, joins mid-way
    h = Harness(graphs)

    async def scenario(sampler: IterationSampler) -> None:
        a = asyncio.create_task(sampler.sample(la, ua, 1.0, guidance=1.5))
        b = asyncio.create_task(sampler.sample(lb, ub, 0.8))
        await wait_until(lambda: len(h.pixels.sizes) >= 50)
        c = await sampler.sample(lc, uc, 1.0, guidance=4.0)
        np.testing.assert_array_equal(c, want_c)
        images_a = await a
        np.testing.assert_array_equal(images_a, want_a)
        np.testing.assert_array_equal(images_a[1:], want_any)
        np.testing.assert_array_equal(await b, want_b)

    h.run(scenario)
    # one hrow call per step serves everyone: 3 sequences + 1 twin, then + c and its twin
    sizes = h.pixels.sizes
    assert set(sizes[:50]) == {4}
    assert 6 in sizes and len(sizes) < 2 * PIXELS
    assert h.observer.steps[0] == 3  # the observer counts sequences, not twins


def test_guidance_zero_adds_nothing(graphs) -> None:
    labels, u = make_request(4, [1, 8])
    want = sample_fast(*graphs.reference, labels, u)
    h = Harness(graphs)

    async def scenario(sampler: IterationSampler) -> None:
        np.testing.assert_array_equal(await sampler.sample(labels, u, 1.0, guidance=0.0), want)

    h.run(scenario)
    assert h.pixels.sizes == [2] * PIXELS and h.rows.sizes == [2] * 28  # no twins


def test_bad_guidance_is_refused(graphs) -> None:
    labels, u = make_request(5, [1])
    h = Harness(graphs)

    async def scenario(sampler: IterationSampler) -> None:
        for bad in (-0.5, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="guidance"):
                sampler.enqueue(labels, u, 1.0, guidance=bad)

    h.run(scenario)
    assert h.pixels.sizes == []


def test_progress_and_preview_follow_the_sampling(graphs) -> None:
    labels, u = make_request(6, [2, 3])
    want = sample_fast(*graphs.reference, labels, u)
    h = Harness(graphs)

    async def scenario(sampler: IterationSampler) -> None:
        ticket = sampler.enqueue(labels, u)
        assert ticket.progress() == (0, 2 * PIXELS)
        await wait_until(lambda: sampler.steps >= 100)
        done, total = ticket.progress()
        preview = ticket.preview()
        steps = sampler.steps  # steps finished (the graph calls recorded include one under way)
        assert total == 2 * PIXELS and done == 2 * steps  # both sequences advance one pixel per step
        row, col = divmod(steps, 28)
        np.testing.assert_array_equal(preview[:, :row], want[:, :row])  # what is drawn is the final image's
        assert not preview[:, row, col:].any() and not preview[:, row + 1:].any()  # nothing beyond
        np.testing.assert_array_equal(await sampler.wait(ticket), want)
        assert ticket.progress() == (2 * PIXELS, 2 * PIXELS)
        np.testing.assert_array_equal(ticket.preview(), want)

    h.run(scenario)
