"""Unit tests for service.batcher: merging, splitting, isolation of failures, deadlines, backpressure."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
import pytest

from service.batcher import (
    Batcher,
    BatcherClosed,
    BatchingConfig,
    DeadlineExceeded,
    QueueFull,
    arrived_at,
)
from service.scheduling import SchedulingObserver


class Recorder:
    """predict = x * 2, recording every call; optionally gated and/or poisoned by negative values."""

    def __init__(self, gate: threading.Event | None = None, delay_s: float = 0.0) -> None:
        self.calls: list[dict[str, np.ndarray]] = []
        self.errors: list[Exception] = []
        self.started = threading.Event()
        self.gate = gate
        self.delay_s = delay_s
        self._lock = threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self.calls.append({k: v.copy() for k, v in inputs.items()})
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(5), "test gate never opened"
        if self.delay_s:
            time.sleep(self.delay_s)
        if (inputs["x"] < 0).any():
            error = ValueError("poisoned row")
            self.errors.append(error)
            raise error
        return {"y": inputs["x"] * 2, "s": inputs["x"].reshape(len(inputs["x"]), -1).sum(axis=1)}

    @property
    def sizes(self) -> list[int]:
        return [len(call["x"]) for call in self.calls]

    def seen(self) -> np.ndarray:
        return np.concatenate([call["x"].reshape(-1) for call in self.calls]) if self.calls else np.empty(0)


class RecordingObserver(SchedulingObserver):
    def __init__(self) -> None:
        self.batches: list[tuple[int, Sequence[float], float]] = []
        self.items = 0
        self.rejects: list[str] = []
        self.depths: list[int] = []

    def on_batch(self, batch_size: int, queue_waits_s: Sequence[float], compute_s: float) -> None:
        self.batches.append((batch_size, list(queue_waits_s), compute_s))

    def on_items(self, n: int) -> None:
        self.items += n

    def on_reject(self, reason: str) -> None:
        self.rejects.append(reason)

    def on_queue_depth(self, depth: int) -> None:
        self.depths.append(depth)


def rows(start: int, n: int, width: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.arange(start * width, (start + n) * width, dtype=np.float32).reshape(n, width)}


def run(
    scenario: Callable[[Batcher], Awaitable[None]],
    predict: Recorder,
    observer: object = None,
    **config: float,
) -> None:
    """Start a batcher around predict, run the scenario, always stop (releasing any gate first)."""

    async def main() -> None:
        batcher = Batcher("test", predict, BatchingConfig(**config), observer=observer)  # type: ignore[arg-type]
        await batcher.start()
        try:
            await asyncio.wait_for(scenario(batcher), 4)
        finally:
            if predict.gate is not None:
                predict.gate.set()
            await asyncio.wait_for(batcher.stop(), 4)

    asyncio.run(main())


async def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.001)


def check(request: dict[str, np.ndarray], result: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(result["y"], request["x"] * 2)
    np.testing.assert_array_equal(result["s"], request["x"].sum(axis=1))


def test_results_match_reference_in_order() -> None:
    predict = Recorder()
    requests = [rows(10 * i, n) for i, n in enumerate([1, 3, 2, 7, 1, 5, 4])]

    async def scenario(batcher: Batcher) -> None:
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        for request, result in zip(requests, results, strict=True):
            check(request, result)

    run(scenario, predict, max_batch_size=8, max_delay_s=0.01)
    assert sorted(predict.seen()) == sorted(np.concatenate([r["x"].reshape(-1) for r in requests]))


def test_concurrent_requests_are_merged_into_one_call() -> None:
    predict, observer = Recorder(), RecordingObserver()
    requests = [rows(i, 1) for i in range(8)]

    async def scenario(batcher: Batcher) -> None:
        early = [asyncio.create_task(batcher.submit(r)) for r in requests[:4]]
        await asyncio.sleep(0.01)  # well inside the delay window: late arrivals still join the batch
        results = await asyncio.gather(*early, *(batcher.submit(r) for r in requests[4:]))
        for request, result in zip(requests, results, strict=True):
            check(request, result)

    run(scenario, predict, observer, max_batch_size=16, max_delay_s=0.2)
    assert predict.sizes == [8]
    assert [b[0] for b in observer.batches] == [8] and len(observer.batches[0][1]) == 8
    assert observer.items == 8 and observer.rejects == []


def test_large_request_is_split_and_reassembled() -> None:
    predict = Recorder()
    request = rows(0, 10)

    async def scenario(batcher: Batcher) -> None:
        check(request, await batcher.submit(request))

    run(scenario, predict, max_batch_size=4, max_delay_s=0.001)
    assert predict.sizes == [4, 4, 2]
    np.testing.assert_array_equal(predict.seen(), request["x"].reshape(-1))


def test_max_batch_size_is_never_exceeded() -> None:
    predict = Recorder()
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 12, size=40)
    requests = [rows(100 * i, int(n)) for i, n in enumerate(sizes)]

    async def scenario(batcher: Batcher) -> None:
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        for request, result in zip(requests, results, strict=True):
            check(request, result)

    run(scenario, predict, max_batch_size=5, max_delay_s=0.005)
    assert max(predict.sizes) <= 5
    assert sum(predict.sizes) == sizes.sum()  # every item computed exactly once
    assert len(predict.sizes) < sum(-(-int(n) // 5) for n in sizes)  # and some chunks were merged


def test_failing_item_fails_only_its_own_request() -> None:
    predict, observer = Recorder(), RecordingObserver()
    good_a, bad, good_b = rows(0, 2), rows(5, 1), rows(9, 3)
    bad["x"][0, 1] = -1.0

    async def scenario(batcher: Batcher) -> None:
        results = await asyncio.gather(
            *(batcher.submit(r) for r in (good_a, bad, good_b)), return_exceptions=True
        )
        check(good_a, results[0])
        check(good_b, results[2])
        assert isinstance(results[1], ValueError)
        assert results[1] is predict.errors[-1]  # the original exception object of the solo run

    run(scenario, predict, observer, max_batch_size=16, max_delay_s=0.05)
    assert predict.sizes == [6, 2, 1, 3]  # merged call failed, then each request chunk ran alone
    assert observer.rejects == ["error"] and observer.items == 5


def test_deadline_exceeded_while_queued_is_never_computed() -> None:
    predict, observer = Recorder(gate=threading.Event()), RecordingObserver()
    late = [rows(50, 1), rows(60, 2)]

    async def scenario(batcher: Batcher) -> None:
        first = asyncio.create_task(batcher.submit(rows(0, 1)))
        await wait_until(predict.started.is_set)  # the only compute slot is now busy
        started = time.monotonic()
        for request in late:
            with pytest.raises(DeadlineExceeded):
                await batcher.submit(request, timeout_s=0.05)
        assert time.monotonic() - started < 1.0
        assert batcher.queue_depth == 0
        predict.gate.set()
        check(rows(0, 1), await first)
        after = rows(70, 1)
        check(after, await batcher.submit(after))  # the batcher still works

    run(scenario, predict, observer, max_batch_size=8, max_delay_s=0.001)
    assert not np.isin(predict.seen(), np.concatenate([r["x"].reshape(-1) for r in late])).any()
    assert observer.rejects == ["deadline", "deadline"]


def test_queue_full_is_raised_immediately() -> None:
    predict, observer = Recorder(gate=threading.Event()), RecordingObserver()

    async def scenario(batcher: Batcher) -> None:
        with pytest.raises(QueueFull):  # a single request above the bound is refused outright
            await batcher.submit(rows(0, 5))
        tasks = [asyncio.create_task(batcher.submit(rows(1, 1)))]
        await wait_until(predict.started.is_set)
        tasks += [asyncio.create_task(batcher.submit(rows(2 + i, 1))) for i in range(4)]
        await asyncio.sleep(0.01)  # the loop takes one into the next batch: still counted as waiting
        assert batcher.queue_depth == 4
        started = time.monotonic()
        with pytest.raises(QueueFull):
            await batcher.submit(rows(9, 1))
        assert time.monotonic() - started < 0.05
        predict.gate.set()
        for i, task in enumerate(tasks):
            check(rows(1 + i, 1), await task)

    run(scenario, predict, observer, max_batch_size=1, max_delay_s=0.0, max_queue_items=4)
    assert observer.rejects == ["queue_full", "queue_full"]


def test_stop_drains_accepted_work_then_refuses() -> None:
    predict, observer = Recorder(delay_s=0.01), RecordingObserver()
    requests = [rows(10 * i, 3) for i in range(6)]

    async def main() -> None:
        batcher = Batcher(
            "drain", predict, BatchingConfig(max_batch_size=4, max_delay_s=0.002), observer=observer
        )
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(r)) for r in requests]
        await asyncio.sleep(0)  # let every submit enqueue its work
        assert batcher.queue_depth > 0
        await asyncio.wait_for(batcher.stop(), 4)
        assert sum(predict.sizes) == 18 and batcher.queue_depth == 0  # all computed before stop returned
        for request, task in zip(requests, tasks, strict=True):
            check(request, await task)
        with pytest.raises(BatcherClosed):
            await batcher.submit(rows(0, 1))
        await asyncio.wait_for(batcher.stop(), 1)  # idempotent

    asyncio.run(main())
    assert observer.rejects == ["closed"]


def test_incompatible_inputs_are_not_merged() -> None:
    predict = Recorder()
    requests = [
        rows(0, 2, width=3),
        rows(1, 1, width=5),
        rows(2, 1, width=3),
        {"x": np.arange(4, dtype=np.float64).reshape(2, 2)},
        {"x": np.ones((1, 3), np.float32), "z": np.zeros((1, 1), np.float32)},
    ]

    async def scenario(batcher: Batcher) -> None:
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        for request, result in zip(requests, results, strict=True):
            check(request, result)

    run(scenario, predict, max_batch_size=16, max_delay_s=0.02)
    signatures = [tuple(sorted((k, v.shape[1:], v.dtype.str) for k, v in c.items())) for c in predict.calls]
    assert len(signatures) == len(set(signatures)) == 4  # one call per signature: only widths-3 merged
    assert sorted(predict.sizes) == [1, 1, 2, 3]


def test_raising_observer_does_not_fail_requests() -> None:
    class Broken:
        def __getattr__(self, name: str) -> Callable[..., None]:
            def fail(*args: object) -> None:
                raise RuntimeError(f"metrics down in {name}")

            return fail

    predict = Recorder()
    poisoned = rows(3, 1)
    poisoned["x"][:] = -1

    async def scenario(batcher: Batcher) -> None:
        check(rows(0, 2), await batcher.submit(rows(0, 2)))
        with pytest.raises(ValueError, match="poisoned"):
            await batcher.submit(poisoned)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(rows(1, 1), timeout_s=0.0)

    run(scenario, predict, Broken(), max_batch_size=4, max_delay_s=0.001)


def test_observers_implement_what_they_record_and_a_missing_method_is_logged(caplog) -> None:
    """The rule for every scheduler: a subclass of SchedulingObserver inherits no-op defaults, so it overrides only
    what it records; an object that does not subclass it and lacks a method fails like any observer, logged and
    swallowed, never failing the request."""

    class OnlyRejects(SchedulingObserver):
        def __init__(self) -> None:
            self.rejects: list[str] = []

        def on_reject(self, reason: str) -> None:
            self.rejects.append(reason)

    class Bare:
        pass

    async def scenario(batcher: Batcher) -> None:
        check(rows(0, 2), await batcher.submit(rows(0, 2)))
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(rows(1, 1), timeout_s=0.0)

    partial = OnlyRejects()
    with caplog.at_level(logging.WARNING, logger="service.batcher"):
        run(scenario, Recorder(), partial)
    assert partial.rejects == ["deadline"] and caplog.records == []
    with caplog.at_level(logging.WARNING, logger="service.batcher"):
        run(scenario, Recorder(), Bare())
    assert {r.getMessage() for r in caplog.records} >= {"batcher 'test': observer.on_batch failed",
                                                       "batcher 'test': observer.on_reject failed"}


def test_cancelled_request_work_is_dropped() -> None:
    predict = Recorder(gate=threading.Event())

    async def scenario(batcher: Batcher) -> None:
        first = asyncio.create_task(batcher.submit(rows(0, 1)))
        await wait_until(predict.started.is_set)
        doomed = [asyncio.create_task(batcher.submit(rows(40 + i, 2))) for i in range(2)]
        await asyncio.sleep(0.01)  # one doomed request waits for the busy slot, the other is queued
        assert batcher.queue_depth == 4 and not any(t.done() for t in doomed)
        for task in doomed:
            task.cancel()
        await asyncio.gather(*doomed, return_exceptions=True)
        assert batcher.queue_depth == 0
        predict.gate.set()
        check(rows(0, 1), await first)
        check(rows(9, 1), await batcher.submit(rows(9, 1)))

    run(scenario, predict, max_batch_size=2, max_delay_s=0.001)
    assert predict.sizes == [1, 1]
    assert not np.isin(predict.seen(), rows(40, 4)["x"]).any()


def test_invalid_inputs_raise_value_error() -> None:
    async def scenario(batcher: Batcher) -> None:
        for bad in (
            {},
            {"x": np.float32(1.0)},
            {"x": np.ones((0, 3))},
            {"x": np.ones((2, 3)), "z": np.ones(3)},
        ):
            with pytest.raises(ValueError):
                await batcher.submit(bad)  # type: ignore[arg-type]

    run(scenario, Recorder())


def test_next_batch_starts_before_the_previous_batchs_callers_resume() -> None:
    # The handlers that a finished batch wakes do real work on the loop (image encoding). The next batch must
    # already be in the executor by then, or the runtime idles while they run.
    predict = Recorder(delay_s=0.02)
    starts: list[float] = []
    handler_done: list[float] = []

    def recording(inputs):
        starts.append(time.perf_counter())
        return predict(inputs)

    async def scenario(batcher: Batcher) -> None:
        async def caller(i: int) -> None:
            await batcher.submit(rows(i, 1))
            if i == 0:
                time.sleep(0.1)  # a slow handler holding the loop
                handler_done.append(time.perf_counter())

        await asyncio.gather(caller(0), caller(1))

    async def main() -> None:
        batcher = Batcher("test", recording, BatchingConfig(max_batch_size=1, max_delay_s=0.0))
        await batcher.start()
        try:
            await asyncio.wait_for(scenario(batcher), 4)
        finally:
            await asyncio.wait_for(batcher.stop(), 4)

    asyncio.run(main())
    assert len(starts) == 2 and len(handler_done) == 1
    assert starts[1] < handler_done[0]  # the second batch started while the first caller's handler ran


def test_compute_time_is_the_call_not_the_loops_delay_in_noticing_it() -> None:
    observer = RecordingObserver()
    predict = Recorder(delay_s=0.01)

    async def scenario(batcher: Batcher) -> None:
        pending = asyncio.ensure_future(batcher.submit(rows(0, 1)))
        await wait_until(predict.started.is_set)
        time.sleep(0.15)  # the loop is busy long after predict finished
        await pending

    run(scenario, predict, observer, max_batch_size=4, max_delay_s=0.0)
    [(size, _waits, compute_s)] = observer.batches
    assert size == 1 and 0.01 <= compute_s < 0.1


def test_failed_calls_count_as_compute_time() -> None:
    observer = RecordingObserver()
    predict = Recorder(delay_s=0.02)

    async def scenario(batcher: Batcher) -> None:
        poisoned = {"x": -np.ones((1, 3), np.float32)}
        results = await asyncio.gather(batcher.submit(poisoned), batcher.submit(rows(0, 1)), return_exceptions=True)
        assert isinstance(results[0], ValueError)
        check(rows(0, 1), results[1])

    run(scenario, predict, observer, max_batch_size=4, max_delay_s=0.01)
    # one merged call that failed, then each request alone: three calls of at least 20 ms, all counted
    assert len(predict.calls) == 3
    [(size, _waits, compute_s)] = observer.batches
    assert size == 2 and compute_s >= 0.06


def test_deadline_counts_from_the_requests_arrival() -> None:
    """Time a request spent before reaching the batcher is not granted again: arrived long ago, refused at once."""
    predict, observer = Recorder(), RecordingObserver()

    async def scenario(batcher: Batcher) -> None:
        arrived_at.set(asyncio.get_running_loop().time() - 5.0)   # arrived 5 s ago; the deadline is 1 s
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(rows(0, 1))
        arrived_at.set(asyncio.get_running_loop().time() - 0.5)   # half of the second left: still served
        check(rows(0, 1), await batcher.submit(rows(0, 1)))

    run(scenario, predict, observer, timeout_s=1.0)
    assert len(predict.calls) == 1 and observer.rejects == ["deadline"]


def test_work_that_would_outlast_its_deadline_is_refused_up_front() -> None:
    """After a slow batch the batcher knows its speed; queued work ahead that would take longer than a new request
    has left is QueueFull at once (503, retry elsewhere), not a 504 after the whole wait."""
    gate = threading.Event()
    predict, observer = Recorder(gate=gate, delay_s=0.05), RecordingObserver()

    async def scenario(batcher: Batcher) -> None:
        gate.set()
        await batcher.submit(rows(0, 1))                   # ~50 ms for one item: the estimate
        assert batcher.expected_wait_s(1, ahead=False) == pytest.approx(0.05, rel=0.5)
        gate.clear()
        held = asyncio.create_task(batcher.submit(rows(1, 1)))   # computing, gated
        await wait_until(lambda: len(predict.calls) == 2)
        queued = [asyncio.create_task(batcher.submit(rows(2 + i, 1))) for i in range(8)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="deadline"):   # 8 queued items ahead at ~50 ms each > 0.3 s
            await batcher.submit(rows(20, 1), timeout_s=0.3)
        gate.set()
        await asyncio.gather(held, *queued)

    run(scenario, predict, observer, max_batch_size=1, timeout_s=5.0)
    assert observer.rejects == ["expected_wait"]
    assert 20 * 3 not in predict.seen()                    # the refused request never reached predict


def test_work_is_refused_when_the_queue_ahead_exceeds_the_queue_wait_limit() -> None:
    """max_queue_wait_s bounds the wait whatever the deadline; the request's own work does not count, so a big
    request on an idle batcher is always taken."""
    gate = threading.Event()
    predict, observer = Recorder(gate=gate, delay_s=0.1), RecordingObserver()

    async def scenario(batcher: Batcher) -> None:
        gate.set()
        await batcher.submit(rows(0, 1))                    # the speed estimate: ~100 ms an item
        check(rows(0, 5), await batcher.submit(rows(0, 5)))  # ~500 ms of its own work, nothing ahead: taken
        gate.clear()
        held = asyncio.create_task(batcher.submit(rows(1, 1)))
        await wait_until(lambda: len(predict.calls) == 7)
        queued = [asyncio.create_task(batcher.submit(rows(2 + i, 1))) for i in range(3)]   # ~300 ms ahead
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="limit 0.25s"):
            await batcher.submit(rows(20, 1))
        gate.set()
        await asyncio.gather(held, *queued)

    run(scenario, predict, observer, max_batch_size=1, timeout_s=30.0, max_queue_wait_s=0.25)
    assert observer.rejects == ["expected_wait"]


def test_abandoning_queued_work_keeps_the_depth_the_wait_estimate_and_the_gauge_exact() -> None:
    """ticket.abandon() from outside (as a route that learns its client left would): the ticket's queued items leave
    the counts at once, without a pass over the queue; its entries are skipped when they reach the head, never
    computed; the others' results are untouched."""
    gate = threading.Event()
    predict, observer = Recorder(gate=gate, delay_s=0.01), RecordingObserver()
    a, b, c = rows(10, 3), rows(20, 2), rows(30, 1)

    async def scenario(batcher: Batcher) -> None:
        gate.set()
        check(rows(0, 1), await batcher.submit(rows(0, 1)))  # a speed estimate, so expected_wait_s() counts
        gate.clear()
        held = asyncio.create_task(batcher.submit(rows(1, 1)))
        await wait_until(lambda: len(predict.calls) == 2)  # the only slot is busy
        tickets = [batcher.enqueue(r) for r in (a, b, c)]
        await asyncio.sleep(0.01)  # a's first item forms the next batch; the other five are queued
        assert batcher.queue_depth == 6
        per_item = batcher.expected_wait_s(1, ahead=False)
        assert batcher.expected_wait_s() == pytest.approx(6 * per_item)
        [queue] = batcher._signature_queues.values()
        entries = len(queue)

        tickets[1].abandon()
        assert batcher.queue_depth == 4 and observer.depths[-1] == 4
        assert batcher.expected_wait_s() == pytest.approx(4 * per_item)
        assert len(queue) == entries  # nothing was scanned or removed: b's entries wait to be skipped
        tickets[1].abandon()  # idempotent
        assert batcher.queue_depth == 4
        with pytest.raises(asyncio.CancelledError):
            await batcher.wait(tickets[1])

        gate.set()
        await held
        check(a, await batcher.wait(tickets[0]))
        check(c, await batcher.wait(tickets[2]))
        assert batcher.queue_depth == 0 and len(queue) == 0 and observer.depths[-1] == 0

    run(scenario, predict, observer, max_batch_size=1)
    assert not np.isin(predict.seen(), b["x"]).any()
    assert observer.rejects == [] and observer.items == 1 + 1 + 3 + 1


def test_abandoned_entries_do_not_pile_up_behind_a_stuck_batch() -> None:
    """Entries of abandoned tickets are swept out once they outnumber the live ones (past a floor), so a storm of
    callers that leave while a batch computes cannot grow the queue without bound."""
    gate = threading.Event()
    predict = Recorder(gate=gate)

    async def scenario(batcher: Batcher) -> None:
        held = asyncio.create_task(batcher.submit(rows(0, 1)))
        await wait_until(predict.started.is_set)
        live = batcher.enqueue(rows(1, 1))
        for i in range(600):
            batcher.enqueue(rows(100 + i, 1)).abandon()
        assert batcher.queue_depth == 1
        assert sum(len(q) for q in batcher._signature_queues.values()) <= 1 + 257
        gate.set()
        await held
        check(rows(1, 1), await batcher.wait(live))
        assert batcher.queue_depth == 0

    run(scenario, predict, max_batch_size=4, max_queue_items=2048)
    assert sorted(predict.seen()) == sorted(np.concatenate([rows(0, 1)["x"], rows(1, 1)["x"]]).reshape(-1))
