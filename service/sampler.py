"""Autoregressive PixelCNN sampling on the exported `vstack` / `hrow` graphs, with iteration-level batching.

The graphs are single forward passes; the sampling loop and its randomness live here, on the host. Every
pixel is drawn by inverting the categorical CDF with a caller-supplied uniform u in [0, 1) (one per pixel),
so the same (label, u, temperature) give the same image whichever path computes the logits and whatever
else shares the batch. This is the numpy twin of `training.pixelcnn.sample_from_logits` / `sample_fast`.

Three samplers, slowest first:
    sample_naive   the whole 28-row image through vstack + hrow for every one of the 784 pixels (reference)
    sample_fast    vstack once per row on rows 0..r only, hrow on that single row per pixel (one batch)
    IterationSampler
                   sample_fast's per-row caching, but every sequence keeps its own position (r, c) and its own
                   cached vfeats row, so concurrent requests share each forward pass and a request that
                   arrives while others are sampling joins at the next step (iteration-level, or
                   "continuous", batching as in LLM servers) instead of waiting for them to finish.

vstack: image (B, 1, H, W) float32 0..255, label (B,) int64 -> vfeats (B, L, 2C, H, W); row r sees rows < r.
hrow:   image (B, 1, H, W), vfeats (B, L, 2C, H, W) -> logits (B, 256, H, W); kernel height 1, rows independent.

numpy + asyncio only: no torch, no HTTP. Errors reuse the batcher's (QueueFull / BatcherClosed -> 503, ...).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.batcher import BatcherClosed, DeadlineExceeded, QueueFull, arrived_at

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
GraphFn = Callable[[Arrays], Arrays]  # named inputs -> named outputs, e.g. one ONNX Runtime session

SIZE = 28  # the IterationSampler's image side (MNIST); the functions infer it from u
PIXELS = SIZE * SIZE


def session_fn(sess: Any) -> GraphFn:
    """Wrap an onnxruntime.InferenceSession as `feeds -> {output name: array}`."""
    names = [o.name for o in sess.get_outputs()]

    def run(feeds: Arrays) -> Arrays:
        return dict(zip(names, sess.run(names, feeds), strict=True))

    return run


# --- one pixel -------------------------------------------------------------------------------------


def sample_pixel(logits: np.ndarray, u: np.ndarray, temperature: float | np.ndarray) -> np.ndarray:
    """logits (B, K), u (B,) in [0, 1) -> values (B,) int64 by inverse CDF of softmax(logits / temperature).

    Computed in float64 as `training.pixelcnn.sample_from_logits`; temperature is a scalar or one per row.
    """
    z = np.asarray(logits, dtype=np.float64) / np.reshape(np.asarray(temperature, dtype=np.float64), (-1, 1))
    e = np.exp(z - z.max(axis=1, keepdims=True))  # stable: the largest term is exp(0) = 1
    probs = e * (1.0 / e.sum(axis=1, keepdims=True))
    cdf = np.cumsum(probs, axis=1)
    idx = np.count_nonzero(cdf < np.asarray(u, dtype=np.float64)[:, None] * cdf[:, -1:], axis=1)
    return np.minimum(idx, z.shape[1] - 1).astype(np.int64)


# --- single-batch samplers --------------------------------------------------------------------------


def _check_inputs(
    labels: Any, u: Any, temperature: Any, pixels: int | None = None
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Validated (labels int64 (n,), u float64 (n, s*s), temperature, s); raises ValueError."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-d integer array, got shape {labels.shape} {labels.dtype}")
    u = np.asarray(u, dtype=np.float64)
    side = math.isqrt(u.shape[-1]) if u.ndim == 2 else 0
    if (
        u.ndim != 2
        or u.shape[0] != labels.size
        or side < 1
        or side * side != u.shape[1]
        or (pixels is not None and u.shape[1] != pixels)
    ):
        want = f"({labels.size}, {pixels if pixels is not None else 'side*side'})"
        raise ValueError(f"u must have shape {want}, got {u.shape}")
    if not ((u >= 0.0) & (u < 1.0)).all():
        raise ValueError("u must lie in [0, 1)")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return labels.astype(np.int64), u, temperature, side


def sample_naive(
    vstack: GraphFn, hrow: GraphFn, labels: np.ndarray, u: np.ndarray, temperature: float = 1.0
) -> np.ndarray:
    """Reference: the whole image through vstack + hrow for every pixel. labels (B,), u (B, s*s) -> (B, s, s) uint8."""
    labels, u, temperature, s = _check_inputs(labels, u, temperature)
    x = np.zeros((labels.size, 1, s, s), np.float32)
    for t in range(s * s):
        r, c = divmod(t, s)
        vfeats = vstack({"image": x, "label": labels})["vfeats"]
        logits = hrow({"image": x, "vfeats": vfeats})["logits"][:, :, r, c]
        x[:, 0, r, c] = sample_pixel(logits, u[:, t], temperature)
    return x[:, 0].astype(np.uint8)


def sample_fast(
    vstack: GraphFn, hrow: GraphFn, labels: np.ndarray, u: np.ndarray, temperature: float = 1.0
) -> np.ndarray:
    """Row-cached: vstack once per row on rows 0..r, hrow on row r alone per pixel. Same images as sample_naive."""
    labels, u, temperature, s = _check_inputs(labels, u, temperature)
    x = np.zeros((labels.size, 1, s, s), np.float32)
    for r in range(s):
        # rows > r cannot influence row r of vfeats: feed only rows 0..r
        vfeats = vstack({"image": np.ascontiguousarray(x[:, :, : r + 1]), "label": labels})["vfeats"]
        vrow = np.ascontiguousarray(vfeats[:, :, :, r : r + 1])  # (B, L, 2C, 1, s)
        for c in range(s):
            logits = hrow({"image": np.ascontiguousarray(x[:, :, r : r + 1]), "vfeats": vrow})["logits"]
            x[:, 0, r, c] = sample_pixel(logits[:, :, 0, c], u[:, r * s + c], temperature)
    return x[:, 0].astype(np.uint8)


# --- iteration-level batching ---------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerConfig:
    max_active: int = 64  # sequences advanced together per step; more wait in a queue
    max_queue: int = 256  # sequences waiting beyond max_active; past it sample() raises QueueFull
    timeout_s: float = 120.0  # default per-request deadline, from the request's arrival (arrived_at)
    max_label: int = 10  # labels 0..max_label are accepted (PixelCNN: digits 0..9, 10 = any digit)


class _Request:
    def __init__(
        self,
        labels: np.ndarray,
        u: np.ndarray,
        temperature: float,
        deadline: float,
        future: asyncio.Future[np.ndarray],
        enqueued_at: float,
    ):
        self.labels, self.u, self.temperature = labels, u, temperature
        self.deadline = deadline  # on the event loop's monotonic clock
        self.future = future
        self.enqueued_at = enqueued_at
        self.images = np.zeros((labels.size, SIZE, SIZE), np.uint8)
        self.remaining = labels.size  # sequences not finished
        self.queued = labels.size  # sequences still waiting in the queue


class IterationSampler:
    """Samples concurrent PixelCNN requests together, one pixel of every active sequence per step.

    One step: the active sequences starting a row (c == 0) get their vfeats row from ONE vstack call on the
    image batch cropped to max(r) + 1 rows; then ONE hrow call over all active sequences, each feeding its
    own current row and cached vfeats row; each takes the logits at its own column with its own uniform and
    temperature, writes the pixel and advances. Queued sequences join at the start of every step, finished
    or abandoned ones leave. Per-sequence state lives in fixed slot arrays (compacted when sequences leave),
    so the hrow feed of cached vfeats rows is a view, not a copy; the state is only touched by the loop
    task, between executor calls, never while one is running.
    """

    def __init__(
        self,
        vstack: GraphFn,
        hrow: GraphFn,
        config: SamplerConfig = SamplerConfig(),
        executor: concurrent.futures.Executor | None = None,
        observer: Any = None,
        name: str = "pixelcnn",
    ) -> None:
        if config.max_active < 1 or config.max_queue < 0 or config.timeout_s <= 0:
            raise ValueError("max_active must be >= 1, max_queue >= 0 and timeout_s > 0")
        self.name = name
        self._vstack, self._hrow = vstack, hrow
        self._config = config
        self._executor = executor  # None: the event loop's default thread pool
        self._observer = observer
        self._queue: deque[tuple[_Request, int]] = deque()  # (request, sequence index), FIFO
        self._queued = 0
        self._slots: list[tuple[_Request, int]] = []  # active sequence k <-> row k of the state arrays
        cap = config.max_active
        self._img = np.zeros((cap, 1, SIZE, SIZE), np.float32)  # pixels sampled so far (0..255)
        self._label = np.zeros(cap, np.int64)
        self._pos = np.zeros(cap, np.int64)  # next pixel, r * SIZE + c
        self._temp = np.ones(cap, np.float64)
        self._u = np.zeros((cap, PIXELS), np.float64)
        self._vrow: np.ndarray | None = None  # (cap, L, 2C, 1, SIZE), allocated at the first vstack output
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self.steps = 0  # loop steps run (one hrow call each)

    @property
    def active(self) -> int:
        """Sequences holding a slot (being sampled)."""
        return len(self._slots)

    @property
    def queued(self) -> int:
        """Sequences accepted and waiting for a slot."""
        return self._queued

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"sampler-{self.name}")

    async def stop(self) -> None:
        """Refuse new requests (BatcherClosed), finish every accepted one, then end the loop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def sample(
        self, labels: np.ndarray, u: np.ndarray, temperature: float = 1.0, timeout_s: float | None = None
    ) -> np.ndarray:
        """labels (n,) 0..max_label, u (n, 784) in [0, 1) -> images (n, 28, 28) uint8."""
        labels, u, temperature, _ = _check_inputs(labels, u, temperature, PIXELS)
        if labels.min() < 0 or labels.max() > self._config.max_label:
            raise ValueError(f"labels must lie in 0..{self._config.max_label}")
        n, cfg = labels.size, self._config
        if self._closing or self._task is None:
            self._notify("on_reject", "closed")
            raise BatcherClosed(f"sampler {self.name!r} is not accepting work")
        if (held := self.active + self._queued) + n > cfg.max_active + cfg.max_queue:
            self._notify("on_reject", "queue_full")
            raise QueueFull(f"sampler {self.name!r}: {held} sequences active or queued, {n} more refused")
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout = cfg.timeout_s if timeout_s is None else timeout_s
        request = _Request(labels, u, temperature, (arrived_at.get() or now) + timeout, loop.create_future(), now)
        self._queue.extend((request, i) for i in range(n))
        self._queued += n
        self._notify("on_queue_depth", self._queued)
        self._wakeup.set()
        timer = asyncio.timeout_at(request.deadline)
        try:
            async with timer:
                return await request.future
        except (TimeoutError, DeadlineExceeded) as exc:
            if isinstance(exc, TimeoutError) and not timer.expired():
                raise  # a TimeoutError raised by a graph call, not our deadline
            self._abandon(request)
            self._notify("on_reject", "deadline")
            raise DeadlineExceeded(f"sampler {self.name!r}: deadline of {timeout:g}s exceeded") from None
        except asyncio.CancelledError:
            self._abandon(request)  # client went away: its sequences leave at the next step
            raise

    def _abandon(self, request: _Request) -> None:
        self._drop(request)
        if not request.future.done():  # normally already cancelled along with the awaiting task
            request.future.cancel()

    # --- bookkeeping (event loop thread only, so no locks) ---

    def _drop(self, request: _Request) -> None:
        """Remove the request's queued sequences now; its active ones leave at the next step (future done)."""
        if request.queued:
            kept = [item for item in self._queue if item[0] is not request]
            self._queued -= len(self._queue) - len(kept)
            self._queue.clear()
            self._queue.extend(kept)
            request.queued = 0

    def _fail(self, request: _Request, error: BaseException, reason: str) -> None:
        if not request.future.done():
            self._drop(request)
            request.future.set_exception(error)
            self._notify("on_reject", reason)

    def _expired(self, request: _Request, now: float) -> bool:
        if now < request.deadline:
            return False
        if not request.future.done():  # sample() reports the rejection when it sees this
            self._drop(request)
            request.future.set_exception(DeadlineExceeded(f"sampler {self.name!r}: deadline exceeded"))
        return True

    def _admit(self, now: float) -> list[float]:
        """Let finished/abandoned sequences leave, then fill free slots from the queue; returns new joiners' waits."""
        keep = [
            k
            for k, (request, _) in enumerate(self._slots)
            if self._pos[k] < PIXELS and not request.future.done() and not self._expired(request, now)
        ]
        if len(keep) < len(self._slots):
            idx = np.asarray(keep, dtype=np.int64)
            m = idx.size
            for array in (self._img, self._label, self._pos, self._temp, self._u, self._vrow):
                if array is not None:
                    array[:m] = array[idx]  # fancy indexing copies first, so overlapping moves are safe
            self._slots = [self._slots[k] for k in keep]
        waits: list[float] = []
        while self._queue and len(self._slots) < self._config.max_active:
            request, i = self._queue.popleft()
            self._queued -= 1
            request.queued -= 1
            if request.future.done() or self._expired(request, now):
                continue
            k = len(self._slots)
            self._slots.append((request, i))
            self._img[k] = 0.0
            self._label[k] = request.labels[i]
            self._pos[k] = 0
            self._temp[k] = request.temperature
            self._u[k] = request.u[i]
            waits.append(now - request.enqueued_at)
        if waits:
            self._notify("on_queue_depth", self._queued)
        return waits

    # --- the loop ---

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                waits = self._admit(loop.time())
                if not self._slots:
                    if self._closing and not self._queue:
                        break
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._step(waits)
        finally:
            # Normally empty; after a crash or cancellation nobody may be left waiting forever.
            closed = BatcherClosed(f"sampler {self.name!r} stopped")
            for request in {request for request, _ in [*self._queue, *self._slots]}:
                self._fail(request, closed, "closed")
            self._queue.clear()
            self._queued = 0
            self._slots = []

    async def _step(self, waits: list[float]) -> None:
        loop = asyncio.get_running_loop()
        b = len(self._slots)
        ar = np.arange(b)
        pos = self._pos[:b].copy()
        rows, cols = pos // SIZE, pos % SIZE
        started = time.perf_counter()
        try:
            starting = np.flatnonzero(cols == 0)  # sequences entering a new row need its vfeats
            if starting.size:
                height = int(rows[starting].max()) + 1  # rows > r never influence vfeats row r
                feeds = {"image": self._img[starting, :, :height], "label": self._label[starting]}
                vfeats = (await loop.run_in_executor(self._executor, self._vstack, feeds))["vfeats"]
                if self._vrow is None:
                    self._vrow = np.zeros((self._config.max_active, *vfeats.shape[1:3], 1, SIZE), np.float32)
                self._vrow[starting, :, :, 0] = vfeats[np.arange(starting.size), :, :, rows[starting]]
            image_row = self._img[ar, :, rows][:, :, None, :]  # (b, 1, 1, SIZE): each sequence's own row
            feeds = {"image": image_row, "vfeats": self._vrow[:b]}
            logits = (await loop.run_in_executor(self._executor, self._hrow, feeds))["logits"]
            values = sample_pixel(logits[ar, :, 0, cols], self._u[ar, pos], self._temp[:b])
        except Exception as exc:
            logger.exception("sampler %r: step over %d sequences failed", self.name, b)
            for request in {request for request, _ in self._slots}:
                self._fail(request, exc, "error")  # they leave at the next _admit
            return
        compute_s = time.perf_counter() - started
        self._img[ar, 0, rows, cols] = values
        self._pos[:b] = pos + 1
        self.steps += 1
        self._notify("on_sampler_step", b)
        self._notify("on_batch", b, waits, compute_s)
        for k in np.flatnonzero(pos + 1 == PIXELS):
            request, i = self._slots[k]
            if request.future.done():
                continue
            request.images[i] = self._img[k, 0]
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(request.images)
                self._notify("on_items", request.labels.size)

    def _notify(self, method: str, *args: object) -> None:
        callback = getattr(self._observer, method, None)  # observers may implement only some methods
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # metrics must never fail a request
            logger.warning("sampler %r: observer.%s failed", self.name, method, exc_info=True)
