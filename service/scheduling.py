"""What the batcher and the sampler share: tickets, deadlines, abandonment, and the observer side channel.

A caller hands a scheduler (`Batcher`, `IterationSampler`) some work and gets a `Ticket`: the future its result
arrives on, its deadline and how many of its work units still sit in the scheduler's queue. It then waits on
the ticket (`Scheduler.wait`) until its deadline. When the deadline passes, the caller is cancelled, or anyone
on the event loop decides the caller is gone (`ticket.abandon()`, e.g. a route that learns its client left),
the ticket is abandoned: its queued units leave the scheduler's counts at once and its entries are skipped
when they reach the head of the queue, so dropping a caller costs O(1) whatever the length of the queue;
work of it already being computed is dropped at the next step.

Nothing here knows HTTP: the API layer maps these exceptions to status codes (QueueFull/BatcherClosed -> 503,
DeadlineExceeded -> 504).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

R = TypeVar("R")  # what a ticket's future resolves to

# When the request that the current task serves arrived, on the event loop's clock; None: now. Deadlines count
# from it, so time a request spent before reaching a scheduler (waiting for the event loop, reading its body,
# decoding images) is not granted again. Set by whoever receives requests (the HTTP layer); a contextvar, so it
# follows the request's task into submit()/sample() without every caller passing it along.
arrived_at: ContextVar[float | None] = ContextVar("arrived_at", default=None)

# Entries of abandoned tickets wait for the head of the queue, holding their inputs, unless this many units of
# them (or more than the live units, if that is more) pile up: then one pass drops them all. Each pass is paid
# for by at least as many abandoned units, so abandoning stays O(1) per unit amortised.
_SWEEP_MIN_UNITS = 256


class SchedulingError(Exception):
    """Base class of the schedulers' own failures."""


class QueueFull(SchedulingError):
    """The queue bound was hit, or the queue ahead would outlast the request's deadline; the caller should
    answer 503 + Retry-After."""


class DeadlineExceeded(SchedulingError):
    """The request waited past its deadline; queued work of it is dropped, never computed."""


class BatcherClosed(SchedulingError):
    """Work handed to a scheduler after stop() began (or before start())."""


class SchedulingObserver(Protocol):
    """The metrics side channel of a scheduler, one observer per graph (the sampler counts as one).

    Every method has a no-op default, so an observer subclasses this and overrides what it records. Schedulers
    call these through `Scheduler._notify` only, which logs and swallows whatever they raise: a method missing
    on an object that does not subclass this is such a failure too."""

    def on_batch(self, batch_size: int, queue_waits_s: Sequence[float], compute_s: float) -> None:
        """One batch (one sampler step) ran: its items, the queue wait of each item that joined, its compute."""

    def on_items(self, n: int) -> None:
        """n items completed successfully."""

    def on_reject(self, reason: str) -> None:
        """A request was turned away or failed: "queue_full", "expected_wait", "deadline", "closed" or "error"."""

    def on_queue_depth(self, depth: int) -> None:
        """Units of work now waiting in the queue."""

    def on_sampler_step(self, active: int) -> None:
        """One autoregressive sampling step ran with `active` sequences sharing it (the sampler only)."""

    def on_cancel(self, stage: str) -> None:
        """A caller went away before its work was done: "queued" (none of it had started, and none of it will
        be computed), or what it was doing by the scheduler's `_stage` ("sampling": its sequences leave at the
        next step; "computing": the batch holding it finishes, the rest of it is dropped)."""


class Ticket(Generic[R]):
    """One caller's claim on a scheduler: its future, its deadline, and its work units still in the queue."""

    def __init__(self, scheduler: Scheduler, future: asyncio.Future[R], deadline: float, timeout_s: float) -> None:
        self.scheduler = scheduler
        self.future = future
        self.deadline = deadline  # on the event loop's monotonic clock
        self.timeout_s = timeout_s  # the time the deadline granted, for messages
        self.queued = 0  # units of its work in the queue, counted in the scheduler's queue depth
        self.dropped = False  # its queued units were discounted; its entries are skipped at the head of the queue

    def abandon(self) -> None:
        """This caller is gone: see `Scheduler.abandon`."""
        self.scheduler.abandon(self)


@dataclass(eq=False)
class QueuedWork:
    """An entry of a scheduler's queue: `n` units of work of one ticket."""

    ticket: Ticket
    n: int


W = TypeVar("W", bound=QueuedWork)


class Scheduler:
    """Base of the batcher and the sampler: the loop task's life, admission of a ticket, the queue's counts,
    waiting until the deadline, abandonment, and observer calls. Everything runs on the event loop thread,
    so no locks."""

    kind = "scheduler"  # names it in messages and logs: "batcher", "sampler"

    def __init__(self, name: str, timeout_s: float, observer: SchedulingObserver | None) -> None:
        self.name = name
        self._timeout_s = timeout_s  # default deadline, from the request's arrival
        self._observer = observer
        self._log = logging.getLogger(type(self).__module__)
        self._queued = 0  # units of work waiting in the queue, abandoned ones not included
        self._dropped_units = 0  # units of abandoned work whose entries have not reached the head yet
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()

    @property
    def queue_depth(self) -> int:
        """Units of work accepted and waiting."""
        return self._queued

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self.kind}-{self.name}")

    async def stop(self) -> None:
        """Refuse new work (BatcherClosed), finish every accepted unit, then end the loop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        raise NotImplementedError

    def _queues(self) -> Iterable[deque]:
        """Every queue of entries, for the sweep of abandoned ones."""
        raise NotImplementedError

    # --- admission ---

    def _refuse_if_closed(self) -> None:
        if self._closing or self._task is None:
            self._notify("on_reject", "closed")
            raise BatcherClosed(f"{self.kind} {self.name!r} is not accepting work")

    def _deadline(self, now: float, timeout_s: float | None) -> tuple[float, float]:
        """(deadline, timeout granted): timeout_s (or the default) from the request's arrival."""
        timeout = self._timeout_s if timeout_s is None else timeout_s
        deadline = (arrived_at.get() or now) + timeout
        if deadline <= now:
            self._notify("on_reject", "deadline")
            raise DeadlineExceeded(f"{self.kind} {self.name!r}: deadline of {timeout:g}s passed before the work "
                                   "was queued")
        return deadline, timeout

    # --- the queue's counts ---

    def _enqueue(self, queue: deque[W], entry: W) -> None:
        queue.append(entry)
        entry.ticket.queued += entry.n
        self._queued += entry.n

    def _take(self, queue: deque[W]) -> W:
        """The entry at the head, off the queue and out of the counts; whether it is wanted is `_live`'s call."""
        entry = queue.popleft()
        if entry.ticket.dropped:
            self._dropped_units -= entry.n
        else:
            self._queued -= entry.n
            entry.ticket.queued -= entry.n
        return entry

    def _drop_queued(self, ticket: Ticket) -> None:
        """Take the ticket's queued units out of the counts now; its entries stay until they reach the head."""
        if ticket.dropped:
            return
        ticket.dropped = True
        units, ticket.queued = ticket.queued, 0
        if units:
            self._queued -= units
            self._dropped_units += units
            if self._dropped_units > max(self._queued, _SWEEP_MIN_UNITS):
                self._sweep()
            self._notify("on_queue_depth", self.queue_depth)

    def _sweep(self) -> None:
        for queue in self._queues():
            kept = [entry for entry in queue if not entry.ticket.dropped]
            queue.clear()
            queue.extend(kept)
        self._dropped_units = 0

    # --- a ticket's end ---

    def _live(self, ticket: Ticket, now: float) -> bool:
        """Whether the ticket's work is still wanted. One past its deadline fails with DeadlineExceeded here
        (its caller is about to give up: don't spend compute on it), which its waiter reports."""
        if ticket.future.done():  # delivered, failed, cancelled or abandoned
            return False
        if now >= ticket.deadline:
            self._drop_queued(ticket)
            ticket.future.set_exception(DeadlineExceeded(f"{self.kind} {self.name!r}: deadline exceeded"))
            return False
        return True

    def _fail(self, ticket: Ticket, error: BaseException, reason: str = "error") -> None:
        if not ticket.future.done():
            self._drop_queued(ticket)
            ticket.future.set_exception(error)
            self._notify("on_reject", reason)

    def abandon(self, ticket: Ticket) -> None:
        """The ticket's caller is gone: its queued work leaves the counts now (O(1)) and is never computed, work of
        it in progress is dropped at the next step, and whoever awaits it gets CancelledError. Counted as a
        cancellation (`on_cancel`, by stage) unless its result was already settled. Idempotent; call it from
        anywhere on the event loop."""
        if not ticket.future.done():
            self._notify("on_cancel", self._stage(ticket))
        self._give_up(ticket)

    def _stage(self, ticket: Ticket) -> str:
        """What the ticket's work is doing, for the cancellation count: "queued" while none of it will run."""
        raise NotImplementedError

    def _give_up(self, ticket: Ticket) -> None:
        if not ticket.future.done():
            ticket.future.cancel()
        self._drop_queued(ticket)

    async def wait(self, ticket: Ticket[R]) -> R:
        """The ticket's result, awaited until its deadline; on the deadline (DeadlineExceeded, reported as a
        "deadline" rejection) or the caller's cancellation, the ticket is abandoned first."""
        timer = asyncio.timeout_at(ticket.deadline)
        try:
            async with timer:
                # Shielded: a task's cancel() also cancels the future it awaits, and abandon() below must find
                # the ticket unsettled to count the cancellation.
                return await asyncio.shield(ticket.future)
        except (TimeoutError, DeadlineExceeded) as exc:
            if isinstance(exc, TimeoutError) and not timer.expired():
                raise  # raised by the work itself (predict, a graph call), not our deadline
            self._give_up(ticket)  # a "deadline" rejection, not a cancellation
            self._notify("on_reject", "deadline")
            raise DeadlineExceeded(f"{self.kind} {self.name!r}: deadline of {ticket.timeout_s:g}s exceeded") from None
        except asyncio.CancelledError:
            self.abandon(ticket)  # the caller went away: never compute its queued work
            raise

    def _notify(self, method: str, *args: object) -> None:
        if self._observer is None:
            return
        try:
            getattr(self._observer, method)(*args)
        except Exception:  # metrics must never fail a request
            self._log.warning("%s %r: observer.%s failed", self.kind, self.name, method, exc_info=True)
