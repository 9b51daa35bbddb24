"""Dynamic batching of inference requests, in the spirit of Triton's dynamic batcher.

Many small requests are merged into few large ONNX Runtime calls so that per-call overhead (and GPU
kernel launches) is paid once per batch instead of once per request. Deadlines, abandonment and the
observer are the scheduler's (service.scheduling), shared with the PixelCNN sampler. This module knows
nothing of HTTP: the API layer maps its exceptions to status codes (QueueFull/BatcherClosed -> 503, ...).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from service.scheduling import (
    BatcherClosed,
    DeadlineExceeded,
    QueuedWork,
    QueueFull,
    Scheduler,
    SchedulingObserver,
    Ticket,
    arrived_at,
)

# The HTTP layer imports these from here.
__all__ = ["Arrays", "BatchTicket", "Batcher", "BatcherClosed", "BatchingConfig", "DeadlineExceeded", "QueueFull",
           "arrived_at"]

Arrays = dict[str, np.ndarray]
# Input names + trailing shapes + dtypes: only work with equal signatures can be concatenated.
Signature = tuple[tuple[str, tuple[int, ...], str], ...]

# Weight of the newest batch in the running estimate of compute seconds per item.
_EWMA_WEIGHT = 0.2


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 64  # items per ONNX Runtime call
    # How long the first queued item waits for more work. 0 (Triton's default too) is eager batching: a batch
    # takes what is queued and goes, and work arriving while it computes forms the next batch; under load the
    # batches grow by themselves, and a lone request never waits for company.
    max_delay_s: float = 0.0
    max_queue_items: int = 1024  # bound on queued items (not requests)
    timeout_s: float = 30.0  # default per-request deadline, measured from the request's arrival (arrived_at)
    # Work is refused (QueueFull) when what is queued ahead of it would take longer than this to compute: the
    # queue holds only what it can finish soon, and a client past it hears so at once (Triton's queue policy
    # with timeout action REJECT).
    max_queue_wait_s: float = math.inf


class BatchTicket(Ticket[Arrays]):
    """One submit(): its inputs' signature, split into chunks of at most max_batch_size items."""

    def __init__(self, batcher: Batcher, future: asyncio.Future[Arrays], deadline: float, timeout_s: float,
                 signature: Signature, chunks: int) -> None:
        super().__init__(batcher, future, deadline, timeout_s)
        self.signature = signature
        self.results: list[Arrays | None] = [None] * chunks
        self.pending = chunks  # chunks not yet computed
        self.computing = 0  # its chunks handed to predict and not finished (a forming batch's are not)


@dataclass(eq=False)
class _Chunk(QueuedWork):
    ticket: BatchTicket
    index: int  # position of this chunk inside its request
    inputs: Arrays
    seq: int  # global arrival order, so the oldest work across signatures goes first
    enqueued_at: float


def _inspect(inputs: Arrays) -> tuple[int, Signature]:
    if not isinstance(inputs, dict) or not inputs:
        raise ValueError("inputs must be a non-empty dict of named arrays")
    sizes, signature = set(), []
    for name, array in sorted(inputs.items()):
        if not isinstance(array, np.ndarray) or array.ndim == 0:
            raise ValueError(f"input {name!r} must be a numpy array with a leading batch dimension")
        sizes.add(array.shape[0])
        signature.append((name, tuple(array.shape[1:]), array.dtype.str))
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"all inputs must share one leading batch dimension n >= 1, got {sorted(sizes)}")
    return sizes.pop(), tuple(signature)


class Batcher(Scheduler):
    kind = "batcher"

    def __init__(
        self,
        name: str,
        predict: Callable[[Arrays], Arrays],
        config: BatchingConfig,
        executor: concurrent.futures.Executor | None = None,
        observer: SchedulingObserver | None = None,
        concurrency: int = 1,
    ) -> None:
        if config.max_batch_size < 1 or config.max_queue_items < 1 or concurrency < 1:
            raise ValueError("max_batch_size, max_queue_items and concurrency must be >= 1")
        super().__init__(name, config.timeout_s, observer)
        self._predict = predict
        self._config = config
        self._executor = executor  # None: the event loop's default thread pool
        self._signature_queues: dict[Signature, deque[_Chunk]] = {}  # one FIFO per signature
        self._forming: list[_Chunk] = []  # the batch being collected or waiting for a compute slot
        self._seq = 0
        self._inflight: set[asyncio.Task[None]] = set()
        # Bounds in-flight predict calls; the next batch is collected while one computes.
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._item_s: float | None = None  # running estimate of compute seconds per item; None until a batch ran

    @property
    def queue_depth(self) -> int:
        """Items accepted but not yet handed to predict (the forming batch counts: it waits too)."""
        return self._queued + sum(c.n for c in self._forming if not c.ticket.future.done())

    def _stage(self, ticket: BatchTicket) -> str:  # type: ignore[override]
        # A batch holding some of it runs to the end, the rest never runs. A chunk in the forming batch has left
        # the queue but will be dropped at launch, never computed.
        return "computing" if ticket.computing else "queued"

    async def submit(self, inputs: Arrays, timeout_s: float | None = None) -> Arrays:
        """The outputs of predict on inputs, batched with other callers' work; see `enqueue` and `wait`."""
        return await self.wait(self.enqueue(inputs, timeout_s))

    def enqueue(self, inputs: Arrays, timeout_s: float | None = None) -> BatchTicket:
        """Queue the work (split into chunks of at most max_batch_size items) or refuse it at once: ValueError,
        BatcherClosed, QueueFull, DeadlineExceeded. The ticket's deadline is timeout_s (default the config's)
        from the request's arrival."""
        n, signature = _inspect(inputs)
        self._refuse_if_closed()
        if (depth := self.queue_depth) + n > self._config.max_queue_items:
            self._notify("on_reject", "queue_full")
            raise QueueFull(f"batcher {self.name!r}: {depth} items queued, {n} more refused")
        loop = asyncio.get_running_loop()
        now, step = loop.time(), self._config.max_batch_size
        deadline, timeout = self._deadline(now, timeout_s)
        ahead = self.expected_wait_s()
        if ahead > self._config.max_queue_wait_s or ahead + self.expected_wait_s(n, ahead=False) > deadline - now:
            self._notify("on_reject", "expected_wait")
            raise QueueFull(f"batcher {self.name!r}: the work queued ahead needs ~{ahead:.2g}s (limit "
                            f"{self._config.max_queue_wait_s:g}s), this request's {n} more; its deadline is in "
                            f"{deadline - now:.2g}s")
        ticket = BatchTicket(self, loop.create_future(), deadline, timeout, signature, -(-n // step))
        queue = self._signature_queues.setdefault(signature, deque())
        for index, start in enumerate(range(0, n, step)):
            chunk_inputs = {name: array[start : start + step] for name, array in inputs.items()}
            self._enqueue(queue, _Chunk(ticket, min(step, n - start), index, chunk_inputs, self._seq, now))
            self._seq += 1
        self._wakeup.set()
        return ticket

    def expected_wait_s(self, n: int = 0, ahead: bool = True) -> float:
        """Seconds to compute the items queued now (with `ahead`) and n more, at the speed of recent batches.
        0 until a batch has run: no estimate, no shedding."""
        if self._item_s is None:
            return 0.0
        return ((self.queue_depth if ahead else 0) + n) * self._item_s / self._concurrency

    # --- taking work off the queues (event loop thread only, so no locks) ---

    def _queues(self) -> Iterable[deque[_Chunk]]:
        return self._signature_queues.values()

    def _pop_oldest(self) -> _Chunk | None:
        while heads := [queue for queue in self._signature_queues.values() if queue]:
            chunk = self._take(min(heads, key=lambda queue: queue[0].seq))
            if self._live(chunk.ticket, asyncio.get_running_loop().time()):
                return chunk
        return None

    def _fill(self, batch: list[_Chunk], size: int) -> tuple[int, bool]:
        """Move compatible queued chunks into batch, oldest first; returns (size, full)."""
        queue, now = self._signature_queues[batch[0].ticket.signature], asyncio.get_running_loop().time()
        while queue:
            head = queue[0]
            if not head.ticket.future.done() and size + head.n > self._config.max_batch_size:
                return size, True  # chunks are never split across calls, and FIFO order is kept
            chunk = self._take(queue)
            if self._live(chunk.ticket, now):
                batch.append(chunk)
                size += chunk.n
        return size, size >= self._config.max_batch_size

    # --- the batch loop ---

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (first := await self._first_chunk()) is not None:
                self._forming = batch = [first]
                size = first.n
                full = size >= self._config.max_batch_size
                window_end = loop.time() + self._config.max_delay_s
                while not full:
                    size, full = self._fill(batch, size)
                    remaining = window_end - loop.time()
                    if full or remaining <= 0 or self._closing:
                        break
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await self._wakeup.wait()
                await self._slots.acquire()
                if not full:  # work that arrived while we waited for a free slot joins this batch
                    self._fill(batch, size)
                self._forming = []
                self._launch(batch)
            await asyncio.gather(*self._inflight)
        finally:
            # Normally empty; after a crash or cancellation nobody may be left waiting forever.
            queued = [chunk for queue in self._signature_queues.values() for chunk in queue]
            for ticket in {chunk.ticket for chunk in [*queued, *self._forming]}:
                self._fail(ticket, BatcherClosed(f"batcher {self.name!r} stopped"), "closed")

    async def _first_chunk(self) -> _Chunk | None:
        while (chunk := self._pop_oldest()) is None:
            if self._closing:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        return chunk

    def _timed_predict(self, inputs: Arrays) -> tuple[Arrays | Exception, float]:
        """predict's outputs, or the exception it raised (returned, so that a failed call's time is counted
        too), and its duration measured in the executor thread: compute only, not the time the event loop
        takes to notice the result."""
        started = time.perf_counter()
        try:
            outputs: Arrays | Exception = self._predict(inputs)
        except Exception as exc:
            outputs = exc
        return outputs, time.perf_counter() - started

    def _submit(self, inputs: Arrays) -> asyncio.Future[tuple[Arrays | Exception, float]]:
        # In the executor, so a long ONNX Runtime call never blocks the event loop.
        return asyncio.get_running_loop().run_in_executor(self._executor, self._timed_predict, inputs)

    def _launch(self, batch: list[_Chunk]) -> None:
        """Hand the batch to the executor now, from the batch loop itself. Starting it from a new task would
        queue the start behind every callback already on the loop: after a batch completes, those are the
        handlers of its requests (image encoding, responses), and the runtime would idle until they ran."""
        now = asyncio.get_running_loop().time()
        batch = [chunk for chunk in batch if self._live(chunk.ticket, now)]  # callers may have left
        for chunk in batch:
            chunk.ticket.computing += 1
        self._notify("on_queue_depth", self.queue_depth)
        if not batch:
            self._slots.release()
            return
        try:
            if len(batch) == 1:
                inputs = batch[0].inputs
            else:
                inputs = {name: np.concatenate([chunk.inputs[name] for chunk in batch]) for name in batch[0].inputs}
            pending = self._submit(inputs)
        except Exception as exc:  # e.g. the executor is shut down: these callers must not wait for nothing
            self._slots.release()
            for chunk in batch:
                self._fail(chunk.ticket, exc)
            return
        task = asyncio.create_task(self._finish(batch, pending, now))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _finish(self, batch: list[_Chunk], pending: asyncio.Future, launched: float) -> None:
        try:
            results, compute_s = await self._collect(batch, pending)
        except asyncio.CancelledError:  # the batcher itself is being torn down: nobody may wait for nothing
            for chunk in batch:
                self._fail(chunk.ticket, BatcherClosed(f"batcher {self.name!r} stopped"), "closed")
            raise
        finally:
            # Free the slot before delivering: the batch loop's wake-up is then queued ahead of the handlers
            # that the deliveries wake, so the next batch starts computing while those handlers run.
            self._slots.release()
            for chunk in batch:
                chunk.ticket.computing -= 1
        ok_items = 0
        for chunk, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                self._fail(chunk.ticket, result)
            elif result is not None:
                ok_items += chunk.n
                self._deliver(chunk, result)
        batch_size = sum(chunk.n for chunk in batch)
        if ok_items == batch_size and compute_s > 0:  # failed or isolated calls say nothing of the speed
            per_item = compute_s / batch_size
            self._item_s = per_item if self._item_s is None else (
                _EWMA_WEIGHT * per_item + (1 - _EWMA_WEIGHT) * self._item_s)
        self._notify("on_batch", batch_size, [launched - chunk.enqueued_at for chunk in batch], compute_s)
        self._notify("on_items", ok_items)

    async def _outputs(self, pending: asyncio.Future, n: int) -> tuple[Arrays | Exception, float]:
        """The call's outputs or its exception (never raised), and its compute seconds."""
        try:
            outputs, compute_s = await pending
        except Exception as exc:  # the executor itself failed: no compute happened
            return exc, 0.0
        if not isinstance(outputs, Exception) and (
                not isinstance(outputs, dict) or any(np.shape(v)[:1] != (n,) for v in outputs.values())):
            outputs = ValueError(f"batcher {self.name!r}: predict must return arrays with leading dim {n}")
        return outputs, compute_s

    async def _collect(self, batch: list[_Chunk], pending: asyncio.Future,
                       ) -> tuple[list[Arrays | BaseException | None], float]:
        """Per chunk: its outputs, the exception its solo run raised, or None if skipped; and the compute
        seconds of every call made, failed ones included."""
        outputs, compute_s = await self._outputs(pending, sum(chunk.n for chunk in batch))
        if not isinstance(outputs, Exception):
            if len(batch) == 1:
                return [outputs], compute_s
            starts = np.cumsum([0] + [chunk.n for chunk in batch[:-1]])
            return [{k: v[s : s + c.n] for k, v in outputs.items()}
                    for c, s in zip(batch, starts, strict=True)], compute_s
        if len(batch) == 1:
            return [outputs], compute_s
        # One poisoned item must not fail its neighbours: isolate it by running each chunk solo.
        results: list[Arrays | BaseException | None] = []
        for chunk in batch:
            if chunk.ticket.future.done():
                results.append(None)
                continue
            part, seconds = await self._outputs(self._submit(chunk.inputs), chunk.n)
            results.append(part)
            compute_s += seconds
        return results, compute_s

    def _deliver(self, chunk: _Chunk, part: Arrays) -> None:
        ticket = chunk.ticket
        if ticket.future.done():
            return
        ticket.results[chunk.index] = part
        ticket.pending -= 1
        if ticket.pending == 0:
            results: list[Arrays] = ticket.results  # type: ignore[assignment]  # all filled now
            if len(results) == 1:
                ticket.future.set_result(results[0])
            else:
                ticket.future.set_result({k: np.concatenate([r[k] for r in results]) for k in results[0]})
