"""Cancellation without HTTP: `unless_disconnected` against a fake client, and the schedulers' `on_cancel` stages
(queued, sampling, computing) for tickets whose callers go away, as opposed to deadlines and finished work.

Graph calls are held on a threading.Event, so which stage a ticket is in when its caller leaves is set by the test,
not by timing. The over-HTTP proof (real server, metrics and latency) is tests/api/test_cancellation.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import numpy as np
import pytest
from starlette.requests import ClientDisconnect

from service.batcher import Batcher, BatchingConfig, DeadlineExceeded
from service.routes.common import unless_disconnected
from service.sampler import IterationSampler, RowSteps, SamplerConfig
from service.scheduling import SchedulingObserver

SIDE = 4  # a 4x4 "image": 16 steps per sequence
GATE_S = 10  # a held graph call gives up after this, so a broken test cannot hang the run


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.001)


class CancelObserver(SchedulingObserver):
    def __init__(self) -> None:
        self.cancels: list[str] = []
        self.rejects: list[str] = []

    def on_cancel(self, stage: str) -> None:
        self.cancels.append(stage)

    def on_reject(self, reason: str) -> None:
        self.rejects.append(reason)


# --- unless_disconnected ---------------------------------------------------------------------------


class FakeClient:
    """A request whose receive() gives nothing until the test says the client left (the body was read already)."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.listening = False
        self.receive_cancelled = False

    async def receive(self) -> dict:
        self.listening = True
        try:
            await self.gone.wait()
        except asyncio.CancelledError:
            self.receive_cancelled = True
            raise
        return {"type": "http.disconnect"}


class Work:
    """A piece of work that ends when told to, and records whether it was cancelled."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = False
        self.cancelled = False

    async def __call__(self) -> str:
        self.started = True
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0)  # cleanup that takes a turn of the loop: the caller must wait for it
            self.cancelled = True
            raise
        return "result"


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_unless_disconnected_returns_the_work_that_finishes_first() -> None:
    async def scenario() -> None:
        client, work = FakeClient(), Work()
        call = asyncio.create_task(unless_disconnected(client, work()))
        await wait_until(lambda: work.started and client.listening)
        work.release.set()
        assert await call == "result"
        assert client.receive_cancelled and not work.cancelled  # the watcher does not outlive the request

    run(scenario)


def test_a_disconnect_cancels_the_work_and_ends_the_request() -> None:
    async def scenario() -> None:
        client, work = FakeClient(), Work()
        call = asyncio.create_task(unless_disconnected(client, work()))
        await wait_until(lambda: work.started and client.listening)
        client.gone.set()
        with pytest.raises(ClientDisconnect):
            await call
        assert work.cancelled  # its cancellation ran to the end before the request did

    run(scenario)


def test_messages_other_than_the_disconnect_are_not_taken_for_one() -> None:
    class Chatty(FakeClient):
        async def receive(self) -> dict:
            if not self.listening:
                self.listening = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return await super().receive()

    async def scenario() -> None:
        client, work = Chatty(), Work()
        call = asyncio.create_task(unless_disconnected(client, work()))
        await wait_until(lambda: work.started and client.listening)
        await asyncio.sleep(0.01)
        assert not call.done() and not work.cancelled
        client.gone.set()
        with pytest.raises(ClientDisconnect):
            await call
        assert work.cancelled

    run(scenario)


def test_cancelling_the_request_cancels_the_work_and_the_watcher() -> None:
    async def scenario() -> None:
        client, work = FakeClient(), Work()
        call = asyncio.create_task(unless_disconnected(client, work()))
        await wait_until(lambda: work.started and client.listening)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await wait_until(lambda: work.cancelled and client.receive_cancelled)

    run(scenario)


# --- the sampler's stages --------------------------------------------------------------------------


class HeldGraphs:
    """vstack / hrow stand-ins for a SIDE x SIDE image (uniform logits), whose calls wait while `hold` is clear."""

    def __init__(self) -> None:
        self.hold = threading.Event()
        self.hold.set()
        self.hrow_calls = 0

    def _wait(self) -> None:
        assert self.hold.wait(GATE_S), "held graph call never released"

    def vstack(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._wait()
        b, _, h, w = feeds["image"].shape
        return {"vfeats": np.zeros((b, 1, 2, h, w), np.float32)}

    def hrow(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._wait()
        self.hrow_calls += 1
        b, _, _, w = feeds["image"].shape
        return {"logits": np.zeros((b, 256, 1, w), np.float32)}


def request(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(n, np.int64), np.random.default_rng(n).random((n, SIDE * SIDE))


def run_sampler(scenario: Callable[[IterationSampler, HeldGraphs], Awaitable[None]], max_active: int = 2,
                ) -> CancelObserver:
    graphs, observer = HeldGraphs(), CancelObserver()

    async def main() -> None:
        sampler = IterationSampler(RowSteps(graphs.vstack, graphs.hrow),
                                   SamplerConfig(max_active=max_active, image_size=SIDE), observer=observer)
        await sampler.start()
        try:
            await asyncio.wait_for(scenario(sampler, graphs), 10)
        finally:
            graphs.hold.set()
            await asyncio.wait_for(sampler.stop(), 10)

    asyncio.run(main())
    return observer


def test_sampler_counts_callers_that_leave_by_stage() -> None:
    async def scenario(sampler: IterationSampler, graphs: HeldGraphs) -> None:
        graphs.hold.clear()
        whole = asyncio.create_task(sampler.sample(*request(1)))  # takes a slot
        split = asyncio.create_task(sampler.sample(*request(2)))  # one sequence in the other slot, one queued
        waiting = asyncio.create_task(sampler.sample(*request(3)))  # no slot left
        await wait_until(lambda: sampler.active == 2 and sampler.queued == 4)
        for task in (waiting, split, whole):
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert sampler.queued == 0  # queued sequences leave the counts at once
        steps = sampler.steps
        graphs.hold.set()  # the step in flight finishes; the next admission lets its sequences go
        await wait_until(lambda: sampler.active == 0)
        assert sampler.steps <= steps + 1

    observer = run_sampler(scenario)
    assert observer.cancels == ["queued", "sampling", "sampling"]
    assert observer.rejects == []


def test_sampler_deadlines_are_not_cancellations() -> None:
    async def scenario(sampler: IterationSampler, graphs: HeldGraphs) -> None:
        graphs.hold.clear()
        sampling = asyncio.create_task(sampler.sample(*request(1), timeout_s=0.1))
        queued = asyncio.create_task(sampler.sample(*request(1), timeout_s=0.05))
        for task in (queued, sampling):
            with pytest.raises(DeadlineExceeded):
                await task

    observer = run_sampler(scenario, max_active=1)
    assert observer.cancels == [] and observer.rejects == ["deadline", "deadline"]


def test_sampler_abandoning_twice_counts_once_and_finished_work_not_at_all() -> None:
    async def scenario(sampler: IterationSampler, graphs: HeldGraphs) -> None:
        done = sampler.enqueue(*request(1))
        assert (await sampler.wait(done)).shape == (1, SIDE, SIDE)
        done.abandon()  # its result was delivered: nothing was cancelled
        graphs.hold.clear()
        left = sampler.enqueue(*request(2))
        left.abandon()
        left.abandon()
        with pytest.raises(asyncio.CancelledError):
            await sampler.wait(left)

    observer = run_sampler(scenario)
    assert observer.cancels == ["queued"]


# --- the batcher's stages --------------------------------------------------------------------------


class HeldPredict:
    """predict = x * 2, recording the rows it saw; waits while `hold` is clear."""

    def __init__(self) -> None:
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.seen: list[np.ndarray] = []

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.seen.append(inputs["x"].copy())
        self.entered.set()
        assert self.hold.wait(GATE_S), "held predict never released"
        return {"y": inputs["x"] * 2}


def rows(start: int, n: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(start, start + n, dtype=np.float32).reshape(n, 1)}


def run_batcher(scenario: Callable[[Batcher, HeldPredict], Awaitable[None]]) -> CancelObserver:
    predict, observer = HeldPredict(), CancelObserver()

    async def main() -> None:
        batcher = Batcher("test", predict, BatchingConfig(max_batch_size=2), observer=observer)
        await batcher.start()
        try:
            await asyncio.wait_for(scenario(batcher, predict), 10)
        finally:
            predict.hold.set()
            await asyncio.wait_for(batcher.stop(), 10)

    asyncio.run(main())
    return observer


def test_batcher_counts_callers_that_leave_by_stage() -> None:
    async def scenario(batcher: Batcher, predict: HeldPredict) -> None:
        predict.hold.clear()
        computing = asyncio.create_task(batcher.submit(rows(0, 2)))
        await wait_until(predict.entered.is_set)
        waiting_for_a_slot = asyncio.create_task(batcher.submit(rows(10, 2)))  # the next batch, full
        queued = asyncio.create_task(batcher.submit(rows(20, 2)))
        await wait_until(lambda: batcher.queue_depth == 4)
        for task in (queued, computing):
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        predict.hold.set()
        np.testing.assert_array_equal((await waiting_for_a_slot)["y"], rows(10, 2)["x"] * 2)

    observer = run_batcher(scenario)
    assert observer.cancels == ["queued", "computing"]


def test_a_batch_still_forming_counts_as_queued() -> None:
    """Work taken into the next batch, which waits for a compute slot, is dropped at launch, never computed."""
    async def scenario(batcher: Batcher, predict: HeldPredict) -> None:
        predict.hold.clear()
        computing = asyncio.create_task(batcher.submit(rows(0, 2)))
        await wait_until(predict.entered.is_set)
        forming = asyncio.create_task(batcher.submit(rows(10, 2)))  # the next batch, full, waiting for the slot
        await wait_until(lambda: batcher.queue_depth == 2)
        forming.cancel()
        with pytest.raises(asyncio.CancelledError):
            await forming
        predict.hold.set()
        np.testing.assert_array_equal((await computing)["y"], rows(0, 2)["x"] * 2)

    observer = run_batcher(scenario)
    assert observer.cancels == ["queued"]


def test_batcher_deadlines_are_not_cancellations_and_abandoning_counts_once() -> None:
    async def scenario(batcher: Batcher, predict: HeldPredict) -> None:
        done = batcher.enqueue(rows(0, 1))
        await batcher.wait(done)
        done.abandon()  # delivered: nothing to count
        predict.entered.clear()
        predict.hold.clear()
        computing = asyncio.create_task(batcher.submit(rows(10, 2), timeout_s=0.1))
        await wait_until(predict.entered.is_set)
        queued = asyncio.create_task(batcher.submit(rows(20, 2), timeout_s=0.05))
        for task in (queued, computing):
            with pytest.raises(DeadlineExceeded):
                await task
        left = batcher.enqueue(rows(30, 2))
        left.abandon()
        left.abandon()

    observer = run_batcher(scenario)
    assert observer.cancels == ["queued"]
    assert observer.rejects == ["deadline", "deadline"]
