"""Unit tests for service.sampler.IterationSampler: iteration-level batching of PixelCNN sampling.

A tiny randomly initialised PixelCNN is exported once per session; every test runs on its row-cached graphs (vstack,
hrow) and on its activation-cached step graphs (vstep, hstep), and every result is compared with the single-batch
`sample_fast` on the same uniforms, which must hold whatever other requests shared the steps, either way.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from service.batcher import BatcherClosed, DeadlineExceeded, QueueFull
from service.sampler import IterationSampler, SamplerConfig, sample_fast
from tests.conftest import SamplingGraphs
from tests.unit.test_batcher import RecordingObserver as BatcherRecorder

PIXELS = 28 * 28
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def graphs(sampling_graphs: SamplingGraphs) -> SamplingGraphs:
    return sampling_graphs


class Recorder:
    """Wraps a graph fn, recording the batch size of every call; can be told to fail calls."""

    def __init__(self, fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> None:
        self.fn = fn
        self.sizes: list[int] = []
        self.heights: list[int] = []
        self.widths: list[int] = []
        self.fail_next = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self.sizes.append(len(feeds["image"]))
            self.heights.append(feeds["image"].shape[2])  # rows of the image fed (vstack, vstep)
            self.widths.append(feeds["image"].shape[3])  # columns (hrow, hstep)
        if self.fail_next.is_set():
            self.fail_next.clear()
            raise RuntimeError("injected graph failure")
        return self.fn(feeds)


class RecordingObserver(BatcherRecorder):
    """The batcher tests' recorder plus the sampler's steps; its queue-depth hook fails on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []

    def on_sampler_step(self, active: int) -> None:
        self.steps.append(active)

    def on_queue_depth(self, depth: int) -> None:
        raise RuntimeError("observer failures must be swallowed")


class Harness:
    """An IterationSampler stepping on `graphs`, recording each call of its per-row graph (`rows`: vstack or
    vstep) and of its per-pixel graph (`pixels`: hrow or hstep)."""

    def __init__(self, graphs: SamplingGraphs, observer: BatcherRecorder | None = None, **config: float) -> None:
        self.rows, self.pixels = Recorder(graphs.row_graph), Recorder(graphs.pixel_graph)
        self.observer = RecordingObserver() if observer is None else observer
        steps = graphs.steps(self.rows, self.pixels)
        self.sampler = IterationSampler(steps, SamplerConfig(**config), observer=self.observer)

    def run(self, scenario: Callable[[IterationSampler], Awaitable[None]]) -> None:
        async def main() -> None:
            await self.sampler.start()
            try:
                await asyncio.wait_for(scenario(self.sampler), 30)
            finally:
                await asyncio.wait_for(self.sampler.stop(), 30)

        asyncio.run(main())


def make_request(seed: int, labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(labels), np.random.default_rng(seed).random((len(labels), PIXELS))


async def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.001)


def test_concurrent_requests_match_sample_fast(graphs: SamplingGraphs) -> None:
    (la, ua), (lb, ub) = make_request(1, [3, 10]), make_request(2, [7])
    want_a = sample_fast(*graphs.reference, la, ua, 1.0)
    want_b = sample_fast(*graphs.reference, lb, ub, 0.7)  # temperature differs per request
    h = Harness(graphs)

    async def scenario(sampler: IterationSampler) -> None:
        a, b = await asyncio.gather(sampler.sample(la, ua, 1.0), sampler.sample(lb, ub, 0.7))
        np.testing.assert_array_equal(a, want_a)
        np.testing.assert_array_equal(b, want_b)
        assert a.dtype == np.uint8 and a.shape == (2, 28, 28)

    h.run(scenario)
    assert h.pixels.sizes == [3] * PIXELS  # every step shared by all three sequences
    assert h.rows.sizes == [3] * 28
    if graphs.kind == "rows":  # vstack on rows 0..r, hrow on all 28 columns of the row
        assert h.rows.heights == list(range(1, 29)) and set(h.pixels.widths) == {28}
    else:  # vstep on the new row and the p = 2 above it, hstep on the new column and the p + 1 left of it
        assert set(h.rows.heights) == {3} and set(h.pixels.widths) == {3}
    assert h.observer.steps == [3] * PIXELS and h.observer.items == 3 and h.observer.rejects == []
    assert len(h.observer.batches[0][1]) == 3 and all(not waits for _, waits, _ in h.observer.batches[1:])


def test_late_request_joins_mid_way(graphs: SamplingGraphs) -> None:
    (la, ua), (lb, ub) = make_request(3, [1, 10]), make_request(4, [9])
    want_a, want_b = sample_fast(*graphs.reference, la, ua), sample_fast(*graphs.reference, lb, ub)
    h = Harness(graphs)

    async def scenario(sampler: IterationSampler) -> None:
        first = asyncio.create_task(sampler.sample(la, ua, 1.0))
        await wait_until(lambda: len(h.pixels.sizes) >= 100)  # the first request is well under way
        b = await sampler.sample(lb, ub, 1.0)
        np.testing.assert_array_equal(b, want_b)
        np.testing.assert_array_equal(await first, want_a)

    h.run(scenario)
    sizes = h.pixels.sizes
    joined = sizes.index(3)  # steps the first request had done alone before the second joined
    assert 100 <= joined < PIXELS
    # it joined at the next step rather than after the first finished: the steps overlap
    assert sizes == [2] * joined + [3] * (PIXELS - joined) + [1] * joined
    assert len(sizes) < 2 * PIXELS
    # vstack runs on the sequences starting a row only: the joiner alone once the first request is done
    assert h.rows.sizes[0] == 2 and h.rows.sizes[-1] == 1 and sum(h.rows.sizes) == 3 * 28


def test_sequences_beyond_max_active_wait_and_join(graphs: SamplingGraphs) -> None:
    labels, u = make_request(5, [0, 4, 10])
    want = sample_fast(*graphs.reference, labels, u)
    h = Harness(graphs, max_active=2)

    async def scenario(sampler: IterationSampler) -> None:
        task = asyncio.create_task(sampler.sample(labels, u))
        await wait_until(lambda: sampler.active == 2)
        assert sampler.queued == 1
        np.testing.assert_array_equal(await task, want)

    h.run(scenario)
    assert max(h.pixels.sizes) == 2 and len(h.pixels.sizes) == 2 * PIXELS
    assert h.observer.items == 3


def test_queue_full(graphs: SamplingGraphs) -> None:
    h = Harness(graphs, max_active=2, max_queue=1)

    async def scenario(sampler: IterationSampler) -> None:
        first = asyncio.create_task(sampler.sample(*make_request(6, [1, 2])))
        await asyncio.sleep(0)  # accepted
        with pytest.raises(QueueFull):
            await sampler.sample(*make_request(7, [3, 4]))  # 2 + 2 > max_active + max_queue
        with pytest.raises(QueueFull):
            await sampler.sample(*make_request(8, [0] * 4))  # could never fit
        third = asyncio.create_task(sampler.sample(*make_request(9, [5])))  # 2 + 1 fits
        await asyncio.sleep(0)
        assert sampler.active + sampler.queued == 3
        first.cancel()
        third.cancel()
        await asyncio.gather(first, third, return_exceptions=True)

    h.run(scenario)
    assert h.observer.rejects == ["queue_full", "queue_full"]


def test_stop_finishes_accepted_work_then_refuses(graphs: SamplingGraphs) -> None:
    (la, ua), (lb, ub) = make_request(10, [2]), make_request(11, [8])
    want_a, want_b = sample_fast(*graphs.reference, la, ua), sample_fast(*graphs.reference, lb, ub)
    h = Harness(graphs, max_active=1)  # the second one is still queued at stop()

    async def main() -> None:
        sampler = h.sampler
        with pytest.raises(BatcherClosed):
            await sampler.sample(la, ua)  # not started
        await sampler.start()
        tasks = [asyncio.create_task(sampler.sample(la, ua)), asyncio.create_task(sampler.sample(lb, ub))]
        await asyncio.sleep(0)
        await asyncio.wait_for(sampler.stop(), 30)
        assert all(t.done() for t in tasks)
        np.testing.assert_array_equal(tasks[0].result(), want_a)
        np.testing.assert_array_equal(tasks[1].result(), want_b)
        with pytest.raises(BatcherClosed):
            await sampler.sample(la, ua)
        await asyncio.wait_for(sampler.stop(), 1)  # idempotent

    asyncio.run(main())
    assert h.observer.rejects == ["closed", "closed"]
    assert len(h.pixels.sizes) == 2 * PIXELS


def test_cancellation_drops_sequences(graphs: SamplingGraphs) -> None:
    (la, ua), (lb, ub) = make_request(12, [6, 10]), make_request(13, [0])
    want_b = sample_fast(*graphs.reference, lb, ub)
    h = Harness(graphs, max_active=3)

    async def scenario(sampler: IterationSampler) -> None:
        a = asyncio.create_task(sampler.sample(la, ua))
        b = asyncio.create_task(sampler.sample(lb, ub))
        queued = asyncio.create_task(sampler.sample(*make_request(14, [1])))  # no free slot: waits
        await wait_until(lambda: len(h.pixels.sizes) >= 50)
        assert sampler.queued == 1
        queued.cancel()
        await asyncio.sleep(0)
        assert sampler.queued == 0  # dropped from the queue at once
        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a
        np.testing.assert_array_equal(await b, want_b)
        assert sampler.active == 0 and sampler.queued == 0

    h.run(scenario)
    sizes = h.pixels.sizes
    cut = sizes.index(1)
    assert sizes == [3] * cut + [1] * (PIXELS - cut)  # the cancelled sequences left at the next step
    assert h.observer.items == 1


def test_deadline_drops_sequences(graphs: SamplingGraphs) -> None:
    lb, ub = make_request(15, [4])
    want_b = sample_fast(*graphs.reference, lb, ub)
    h = Harness(graphs)

    async def scenario(sampler: IterationSampler) -> None:
        b = asyncio.create_task(sampler.sample(lb, ub))
        with pytest.raises(DeadlineExceeded):
            await sampler.sample(*make_request(16, [1, 2]), timeout_s=0.05)
        np.testing.assert_array_equal(await b, want_b)

    h.run(scenario)
    assert h.observer.rejects == ["deadline"]
    assert h.pixels.sizes[0] == 3 and h.pixels.sizes[-1] == 1 and len(h.pixels.sizes) == PIXELS


def test_graph_failure_fails_the_step_and_the_sampler_goes_on(graphs: SamplingGraphs) -> None:
    labels, u = make_request(17, [3])
    want = sample_fast(*graphs.reference, labels, u)
    h = Harness(graphs)

    async def scenario(sampler: IterationSampler) -> None:
        h.pixels.fail_next.set()
        with pytest.raises(RuntimeError, match="injected"):
            await sampler.sample(*make_request(18, [1, 2]))
        np.testing.assert_array_equal(await sampler.sample(labels, u), want)

    h.run(scenario)
    assert h.observer.rejects == ["error"]


def test_bad_requests_are_refused(graphs: SamplingGraphs) -> None:
    h = Harness(graphs)

    async def scenario(sampler: IterationSampler) -> None:
        with pytest.raises(ValueError, match="labels"):
            await sampler.sample(*make_request(19, [11]))
        with pytest.raises(ValueError, match="u must have shape"):
            await sampler.sample(np.array([1]), np.zeros((1, 100)))
        with pytest.raises(ValueError, match="temperature"):
            await sampler.sample(*make_request(20, [1]), temperature=-1.0)
        assert sampler.active == sampler.queued == 0

    h.run(scenario)
    assert h.pixels.sizes == []


def test_abandoning_from_outside_drops_queued_and_active_sequences(graphs: SamplingGraphs) -> None:
    """ticket.abandon() (as a route that learns its client left would): queued sequences leave the counts and
    the queue-depth gauge at once, active ones leave at the next step; the others are untouched."""
    (la, ua), (lb, ub) = make_request(21, [2, 10]), make_request(22, [5])
    want_b = sample_fast(*graphs.reference, lb, ub)
    observer = BatcherRecorder()  # records queue depths (the default harness observer fails them on purpose)
    h = Harness(graphs, observer, max_active=2)

    async def scenario(sampler: IterationSampler) -> None:
        a = sampler.enqueue(la, ua)
        await wait_until(lambda: len(h.pixels.sizes) >= 20)
        waiting = sampler.enqueue(*make_request(23, [1, 3, 4]))
        b = sampler.enqueue(lb, ub)
        assert sampler.queue_depth == sampler.queued == 4 and observer.depths[-1] == 4
        waiting.abandon()
        assert sampler.queued == 1 and observer.depths[-1] == 1
        with pytest.raises(asyncio.CancelledError):
            await sampler.wait(waiting)
        steps = len(h.pixels.sizes)
        a.abandon()
        np.testing.assert_array_equal(await sampler.wait(b), want_b)
        assert sampler.active == sampler.queued == 0 and observer.depths[-1] == 0
        cut = h.pixels.sizes.index(1, steps - 1)  # b took a freed slot at the step after the abandonment
        assert cut <= steps + 1 and h.pixels.sizes[cut:] == [1] * PIXELS

    h.run(scenario)
    assert observer.items == 1 and observer.rejects == []


def causal_vstack(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A stand-in for vstack of any image size: row r of vfeats (B, 1, 2, H, W) sees rows < r and the label."""
    image, label = feeds["image"], feeds["label"]
    above = (np.cumsum(image, axis=2) - image)[:, :, None] / 255.0 + label[:, None, None, None, None]
    return {"vfeats": np.concatenate([above, -above], axis=2).astype(np.float32)}


def toy_hrow(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A stand-in for hrow: logits (B, 256, h, W) peaked where the row's vfeats and the pixels left of c point."""
    image, vfeats = feeds["image"], feeds["vfeats"]
    left = np.cumsum(image, axis=3) - image
    centre = (vfeats[:, 0, 0] * 37.0 + left[:, 0] * 0.3) % 256  # (B, h, W)
    k = np.arange(256, dtype=np.float64)[None, :, None, None]
    return {"logits": (-((k - centre[:, None]) ** 2) / 200.0).astype(np.float32)}


def test_image_size_and_labels_come_from_the_config() -> None:
    side = 5
    labels, u = np.array([0, 3, 2]), np.random.default_rng(24).random((3, side * side))
    want = sample_fast(causal_vstack, toy_hrow, labels, u, 0.8)
    toy = SamplingGraphs("rows", (causal_vstack, toy_hrow), causal_vstack, toy_hrow)
    h = Harness(toy, max_active=2, image_size=side, num_classes=3)

    async def scenario(sampler: IterationSampler) -> None:
        got = await sampler.sample(labels, u, 0.8)
        assert got.shape == (3, side, side) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
        assert len(np.unique(got)) > 5  # the toy model samples varied values
        with pytest.raises(ValueError, match=r"labels must lie in 0\.\.3"):
            await sampler.sample(np.array([4]), u[:1])
        with pytest.raises(ValueError, match=r"u must have shape \(1, 25\)"):
            await sampler.sample(np.array([1]), np.zeros((1, PIXELS)))

    h.run(scenario)
    assert h.rows.heights[:side] == list(range(1, side + 1)) and len(h.pixels.sizes) == 2 * side * side


def test_the_runtime_fills_the_sampler_from_the_manifest_and_only_it_has_sampler_series() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import Metrics
    from service.runtime import ModelVersion, session_factory
    from service.settings import Settings
    from service.store import validate_version

    settings = Settings(providers="cpu", intra_op_threads=1)
    lv = validate_version(REPO_ROOT / "models_store" / "pixelcnn" / "1", session_factory(settings))
    assert (lv.manifest.model["image_size"], lv.manifest.model["num_classes"]) == (28, 10)
    lv.manifest = lv.manifest.model_copy(update={"model": {**lv.manifest.model, "image_size": 14, "num_classes": 4}})
    metrics = Metrics()
    with ThreadPoolExecutor(1) as executor:
        mv = ModelVersion(lv, settings, executor, metrics)
    assert mv.sampler is not None
    assert (mv.sampler.config.image_size, mv.sampler.config.num_classes) == (14, 4)
    text = metrics.render()[0].decode()
    graphs = {s.labels["graph"] for f in text_string_to_metric_families(text) for s in f.samples
              if s.name.startswith("genserve_sampler_active_sequences")}
    assert graphs == {"sampler"}


def test_row_steps_run_vstack_in_chunks_and_draw_the_same_images(tiny_pixelcnn_onnx) -> None:
    """vstack on 2 sequences at a time (5 guided sequences and their twins: 10 per row, so 5 calls) keeps only
    each one's own row of each call's answer: the images are sample_fast's."""
    from service.sampler import RowSteps

    _, vstack, hrow = tiny_pixelcnn_onnx
    labels, u = make_request(5, [1, 2, 10, 4, 7])
    want = sample_fast(vstack, hrow, labels, u, 1.0, guidance=1.5, any_label=10)
    rows = Recorder(vstack)
    sampler = IterationSampler(RowSteps(rows, hrow, chunk=2), SamplerConfig())

    async def main() -> np.ndarray:
        await sampler.start()
        try:
            return await asyncio.wait_for(sampler.sample(labels, u, 1.0, guidance=1.5), 60)
        finally:
            await asyncio.wait_for(sampler.stop(), 30)

    np.testing.assert_array_equal(asyncio.run(main()), want)
    assert max(rows.sizes) == 2 and len(rows.sizes) == 28 * 5  # twins included: 10 sequences a row, 2 a call
