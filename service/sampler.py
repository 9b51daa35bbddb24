"""Autoregressive PixelCNN sampling on the exported `vstack` / `hrow` graphs, with iteration-level batching.

The graphs are single forward passes; the sampling loop and its randomness live here, on the host. Every
pixel is drawn by inverting the categorical CDF with a caller-supplied uniform u in [0, 1) (one per pixel),
so the same (label, u, temperature) give the same image whichever path computes the logits and whatever
else shares the batch. This is the numpy twin of `training.pixelcnn.sample_from_logits` / `sample_fast`.

Four samplers, slowest first:
    sample_naive   the whole image through vstack + hrow for every one of its pixels (reference)
    sample_fast    vstack once per row on rows 0..r only, hrow on that single row per pixel (one batch)
    sample_cached  every layer's activations cached: vstep on one row per row, hstep on one position per pixel
                   (one batch; versions exported with the step graphs)
    IterationSampler
                   either caching (service.sampler_steps), but every sequence keeps its own position (r, c) and
                   its own caches, so concurrent requests share each forward pass and a request that
                   arrives while others are sampling joins at the next step (iteration-level, or
                   "continuous", batching as in LLM servers) instead of waiting for them to finish.

Classifier-free guidance (Ho & Salimans, 2022, "Classifier-Free Diffusion Guidance", applied to the 256-way
logits of each pixel): a sequence with weight w > 0 is drawn from (1 + w) * cond - w * uncond, where uncond is
the same prefix under the "any digit" label. Its unconditional twin rides in the same vstack and hrow calls as
every other sequence; w = 0 adds nothing, so its images are bit-identical to unguided sampling.

Completion: a sequence may come with given pixels (an image and a mask of the known ones). It starts at its first
unknown pixel, with every known pixel already in place (pixels at or after a position never influence its logits,
so known pixels further on cannot leak backwards), and a known pixel met later is kept instead of drawn. For a
raster-order prefix (the top rows) that is the exact conditional; after an unknown pixel, a known one is only
conditioned on by the pixels that follow it. Uniforms stay one per pixel index, so completions are seeded and
batch-independent like samples.

vstack: image (B, 1, H, W) float32 0..255, label (B,) int64 -> vfeats (B, L, 2C, H, W); row r sees rows < r.
hrow:   image (B, 1, H, W), vfeats (B, L, 2C, H, W) -> logits (B, 256, H, W); kernel height 1, rows independent.
vstep:  image (B, 1, p+n, W) rows r-1-p .. r+n-2, vcache (B, L-1, C, p, W), label (B,), row (B,) r
        -> vfeats (B, L, 2C, n, W) of rows r .. r+n-1, vnew (B, L-1, C, n, W) (training.pixelcnn.vertical_step)
hstep:  image (B, 1, 1, p+n) columns c-p-1 .. c+n-2, hcache (B, L-1, C, 1, p), vfeats (B, L, 2C, 1, n), col (B,) c
        -> logits (B, 256, 1, n), hnew (B, L-1, C, 1, n) (training.pixelcnn.horizontal_step)

numpy + asyncio only: no torch, no HTTP. Deadlines, abandonment, errors (QueueFull / BatcherClosed -> 503, ...)
and the observer are the scheduler's (service.scheduling), shared with the batcher.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.sampler_steps import (
    Arrays,
    CachedSteps,
    CacheGeometry,
    GraphFn,
    RowSteps,
    StepInputs,
    window_cols,
    window_rows,
)
from service.scheduling import BatcherClosed, QueuedWork, QueueFull, Scheduler, SchedulingObserver, Ticket

logger = logging.getLogger(__name__)

__all__ = ["CachedSteps", "CacheGeometry", "IterationSampler", "RowSteps", "SamplerConfig", "sample_cached",
           "sample_fast", "sample_naive", "sample_pixel", "session_fn"]

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


def guided_logits(cond: np.ndarray, uncond: np.ndarray, guidance: float | np.ndarray) -> np.ndarray:
    """(B, K) conditional and unconditional logits, guidance w >= 0 (scalar or (B,)) -> (1 + w) * cond - w * uncond
    in float64. Weights of 0 give cond exactly."""
    w = np.reshape(np.asarray(guidance, dtype=np.float64), (-1, 1))
    return (1.0 + w) * np.asarray(cond, dtype=np.float64) - w * np.asarray(uncond, dtype=np.float64)


def _check_guidance(guidance: Any) -> float:
    guidance = float(guidance)
    if not (math.isfinite(guidance) and guidance >= 0.0):
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")
    return guidance


def _check_given(given: Any, n: int, side: int) -> tuple[np.ndarray, np.ndarray] | None:
    """None, or (images (n, side, side) uint8, known (n, side * side) bool) with an unknown pixel in every image."""
    if given is None:
        return None
    images, known = given
    images, known = np.asarray(images), np.asarray(known)
    if images.shape != (n, side, side) or images.dtype != np.uint8:
        raise ValueError(f"given images must be ({n}, {side}, {side}) uint8, got {images.shape} {images.dtype}")
    if known.shape != (n, side * side) or known.dtype != np.bool_:
        raise ValueError(f"given mask must be ({n}, {side * side}) bool, got {known.shape} {known.dtype}")
    if known.all(axis=1).any():
        raise ValueError("every image must leave at least one pixel unknown")
    return images, known


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


@dataclass
class _Batch:
    """One batch of the single-batch samplers: n images drawn pixel by pixel, with guided ones' unconditional twins
    after them in `labels` and `x` (the pixels so far, given ones in place)."""

    n: int
    side: int
    labels: np.ndarray  # (n,) or, guided, (2n,): the twins labelled "any digit"
    u: np.ndarray
    temperature: float
    weights: np.ndarray | None  # (n,) guidance weights, 0 for "any digit"; None: unguided
    x: np.ndarray  # (len(labels), 1, side, side) float32
    known: np.ndarray  # (n, side * side) bool

    @classmethod
    def of(cls, labels: Any, u: Any, temperature: Any, guidance: Any, any_label: int | None,
           given: tuple[np.ndarray, np.ndarray] | None) -> _Batch:
        labels, u, temperature, s = _check_inputs(labels, u, temperature)
        guidance, n = _check_guidance(guidance), labels.size
        given = _check_given(given, n, s)
        weights = None
        if guidance > 0:
            if any_label is None:
                raise ValueError("guidance needs any_label, the unconditional label")
            weights = np.where(labels == any_label, 0.0, guidance)  # as the IterationSampler: "any digit" unguided
            labels = np.concatenate([labels, np.full(n, any_label, np.int64)])
        x = np.zeros((labels.size, 1, s, s), np.float32)
        known = np.zeros((n, s * s), bool)
        if given is not None:
            images, known = given
            x[:, 0] = np.tile(np.where(known.reshape(n, s, s), images, 0), (labels.size // n, 1, 1))
        return cls(n, s, labels, u, temperature, weights, x, known)

    def draw(self, logits: np.ndarray, r: int, c: int) -> None:
        """Pixel (r, c) of every image from its logits (len(labels), K), guided where weighted; given ones kept."""
        n, t = self.n, r * self.side + c
        if self.weights is not None:
            logits = guided_logits(logits[:n], logits[n:], self.weights)
        drawn = sample_pixel(logits[:n], self.u[:, t], self.temperature)
        self.x[:n, 0, r, c] = np.where(self.known[:, t], self.x[:n, 0, r, c], drawn)
        if self.weights is not None:
            self.x[n:, 0, r, c] = self.x[:n, 0, r, c]  # the unconditional twins follow the guided prefix

    def images(self) -> np.ndarray:
        return self.x[: self.n, 0].astype(np.uint8)


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
    vstack: GraphFn, hrow: GraphFn, labels: np.ndarray, u: np.ndarray, temperature: float = 1.0,
    guidance: float = 0.0, any_label: int | None = None, given: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Row-cached: vstack once per row on rows 0..r, hrow on row r alone per pixel. Same images as sample_naive.

    With guidance w > 0 the batch is doubled, its second half labelled `any_label` (required then), and each pixel
    drawn from guided_logits: the reference of the IterationSampler's guided steps. With `given` (images, known
    mask), known pixels are in place from the start and kept: the reference of completion."""
    batch = _Batch.of(labels, u, temperature, guidance, any_label, given)
    x, labels, s = batch.x, batch.labels, batch.side
    for r in range(s):
        if batch.known[:, r * s:(r + 1) * s].all():
            continue  # nothing to draw in this row; the next one's vfeats see it through x
        # rows > r cannot influence row r of vfeats: feed only rows 0..r
        vfeats = vstack({"image": np.ascontiguousarray(x[:, :, : r + 1]), "label": labels})["vfeats"]
        vrow = np.ascontiguousarray(vfeats[:, :, :, r : r + 1])  # (B, L, 2C, 1, s)
        for c in range(s):
            logits = hrow({"image": np.ascontiguousarray(x[:, :, r : r + 1]), "vfeats": vrow})["logits"][:, :, 0, c]
            batch.draw(logits, r, c)
    return batch.images()


def sample_cached(
    vstep: GraphFn, hstep: GraphFn, geometry: CacheGeometry, labels: np.ndarray, u: np.ndarray,
    temperature: float = 1.0, guidance: float = 0.0, any_label: int | None = None,
    given: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Activation-cached: vstep on each row once, hstep on each pixel once, every call on the new position only.
    Same images as sample_naive. Guidance and `given` pixels as in sample_fast; every row and pixel is stepped
    through, given or not, so this stays the plain reference of the IterationSampler's prefills."""
    batch = _Batch.of(labels, u, temperature, guidance, any_label, given)
    x, labels, s = batch.x, batch.labels, batch.side
    b, g, p = labels.size, geometry, geometry.context
    members = np.arange(b)
    vcache = np.zeros((b, g.depth, g.channels, p, s), np.float32)
    for r in range(s):
        at = np.full(b, r, np.int64)
        out = vstep({"image": window_rows(x, members, at, 1, p), "vcache": vcache, "label": labels, "row": at})
        vfeats, vcache = out["vfeats"], np.concatenate([vcache, out["vnew"]], axis=3)[:, :, :, -p:]
        hcache = np.zeros((b, g.depth, g.channels, 1, p), np.float32)
        for c in range(s):
            at = np.full(b, c, np.int64)
            out = hstep({"image": window_cols(x, members, np.full(b, r), at, 1, p), "hcache": hcache,
                         "vfeats": np.ascontiguousarray(vfeats[..., c:c + 1]), "col": at})
            hcache = np.concatenate([hcache, out["hnew"]], axis=4)[..., -p:]
            batch.draw(out["logits"][:, :, 0, 0], r, c)
    return batch.images()


# --- iteration-level batching ---------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerConfig:
    max_active: int = 64  # sequences advanced together per step; more wait in a queue
    max_queue: int = 256  # sequences waiting beyond max_active; past it sample() raises QueueFull
    timeout_s: float = 120.0  # default per-request deadline, from the request's arrival (arrived_at)
    # The model's geometry, from its manifest: images are image_size x image_size, and labels 0..num_classes are
    # accepted (num_classes itself meaning "any class": for the PixelCNN, digits 0..9 and 10 = any digit).
    image_size: int = 28
    num_classes: int = 10


class SamplingTicket(Ticket[np.ndarray]):
    """One sample() call: n sequences, each with its label and uniforms, sharing one temperature and guidance."""

    def __init__(self, sampler: IterationSampler, future: asyncio.Future[np.ndarray], deadline: float,
                 timeout_s: float, labels: np.ndarray, u: np.ndarray, temperature: float, guidance: float,
                 enqueued_at: float, given: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        super().__init__(sampler, future, deadline, timeout_s)
        self.sampler = sampler  # the scheduler, typed
        self.labels, self.u, self.temperature, self.guidance = labels, u, temperature, guidance
        self.given = given  # (images (n, side, side) uint8, known (n, side * side) bool), or None
        self.enqueued_at = enqueued_at
        side = sampler.config.image_size
        self.images = np.zeros((labels.size, side, side), np.uint8)
        self.remaining = labels.size  # sequences not finished

    def progress(self) -> tuple[int, int]:
        """(pixels drawn so far, pixels in all) over the ticket's images."""
        return self.sampler.progress(self)

    def preview(self) -> np.ndarray:
        """(n, side, side) uint8: the images as drawn so far, zeros where no pixel was drawn yet."""
        return self.sampler.preview(self)


@dataclass(eq=False)
class _Sequence(QueuedWork):
    """One image of a ticket waiting for a slot (n = 1)."""

    ticket: SamplingTicket
    index: int  # which of the ticket's images


class IterationSampler(Scheduler):
    """Samples concurrent PixelCNN requests together, one pixel of every active sequence per step.

    One step: `steps` (service.sampler_steps: RowSteps on vstack / hrow, or CachedSteps on vstep / hstep) gives
    the logits of every active sequence at its own position, in one call of the per-pixel graph over all of them
    (and, for those entering a row, one call of the per-row graph); each sequence takes them with its own
    uniform, temperature and guidance, writes the pixel and advances. A guided sequence adds its unconditional
    twin (same prefix, the "any digit" label, its own caches) to the calls. Queued sequences join at the start of
    every step, finished or abandoned ones leave. Per-sequence state lives in fixed slot arrays (compacted when
    sequences leave); it is only touched by the loop task, between executor calls, never while one is running.
    """

    kind = "sampler"

    def __init__(
        self,
        steps: RowSteps | CachedSteps,
        config: SamplerConfig = SamplerConfig(),
        executor: concurrent.futures.Executor | None = None,
        observer: SchedulingObserver | None = None,
        name: str = "pixelcnn",
    ) -> None:
        if config.max_active < 1 or config.max_queue < 0 or config.timeout_s <= 0:
            raise ValueError("max_active must be >= 1, max_queue >= 0 and timeout_s > 0")
        if config.image_size < 1 or config.num_classes < 0:
            raise ValueError("image_size must be >= 1 and num_classes >= 0")
        super().__init__(name, config.timeout_s, observer)
        self.stepper = steps  # how a step's logits are computed: the graphs and the caches they read
        self.config = config
        self._executor = executor  # None: the event loop's default thread pool
        self._queue: deque[_Sequence] = deque()  # FIFO
        self._slots: list[tuple[SamplingTicket, int]] = []  # active sequence k <-> row k of the state arrays
        cap, side = config.max_active, config.image_size
        self._side, self._pixels = side, side * side
        self._img = np.zeros((cap, 1, side, side), np.float32)  # pixels sampled so far (0..255)
        self._label = np.zeros(cap, np.int64)
        self._pos = np.zeros(cap, np.int64)  # next pixel, r * side + c
        self._temp = np.ones(cap, np.float64)
        self._guid = np.zeros(cap, np.float64)  # guidance weight; 0 for unguided and "any digit" sequences
        self._u = np.zeros((cap, self._pixels), np.float64)
        self._known = np.zeros((cap, self._pixels), bool)  # given pixels, kept instead of drawn
        self._fresh = np.zeros(cap, bool)  # joined since the last step: no caches yet, whatever its position
        self.steps = 0  # loop steps run (one call of the per-pixel graph each)

    @property
    def active(self) -> int:
        """Sequences holding a slot (being sampled)."""
        return len(self._slots)

    @property
    def queued(self) -> int:
        """Sequences accepted and waiting for a slot."""
        return self._queued

    async def sample(
        self, labels: np.ndarray, u: np.ndarray, temperature: float = 1.0, timeout_s: float | None = None,
        guidance: float = 0.0, given: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """labels (n,) 0..num_classes, u (n, side * side) in [0, 1) -> images (n, side, side) uint8. With `given`
        (images, known mask), a completion: the known pixels are kept, the others drawn."""
        return await self.wait(self.enqueue(labels, u, temperature, timeout_s, guidance, given))

    def enqueue(
        self, labels: np.ndarray, u: np.ndarray, temperature: float = 1.0, timeout_s: float | None = None,
        guidance: float = 0.0, given: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> SamplingTicket:
        """Queue the n sequences or refuse them at once: ValueError, BatcherClosed, QueueFull, DeadlineExceeded.
        The ticket's deadline is timeout_s (default the config's) from the request's arrival."""
        labels, u, temperature, _ = _check_inputs(labels, u, temperature, self._pixels)
        guidance = _check_guidance(guidance)
        given = _check_given(given, labels.size, self._side)
        if labels.min() < 0 or labels.max() > self.config.num_classes:
            raise ValueError(f"labels must lie in 0..{self.config.num_classes}")
        n, cfg = labels.size, self.config
        self._refuse_if_closed()
        if (held := self.active + self._queued) + n > cfg.max_active + cfg.max_queue:
            self._notify("on_reject", "queue_full")
            raise QueueFull(f"sampler {self.name!r}: {held} sequences active or queued, {n} more refused")
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline, timeout = self._deadline(now, timeout_s)
        ticket = SamplingTicket(self, loop.create_future(), deadline, timeout, labels, u, temperature, guidance, now,
                                given)
        for i in range(n):
            self._enqueue(self._queue, _Sequence(ticket, 1, i))
        self._notify("on_queue_depth", self._queued)
        self._wakeup.set()
        return ticket

    # --- bookkeeping (event loop thread only, so no locks) ---

    def progress(self, ticket: SamplingTicket) -> tuple[int, int]:
        """(pixels drawn, pixels in all) of a ticket of this sampler: O(active sequences)."""
        done = (ticket.labels.size - ticket.remaining) * self._pixels
        for k, (holder, _) in enumerate(self._slots):
            if holder is ticket and self._pos[k] < self._pixels:  # finished ones are counted above
                done += int(self._pos[k])
        return done, ticket.labels.size * self._pixels

    def preview(self, ticket: SamplingTicket) -> np.ndarray:
        """The ticket's images as drawn so far (finished ones whole, active ones up to their position)."""
        images = ticket.images.copy()
        for k, (holder, i) in enumerate(self._slots):
            if holder is ticket and self._pos[k] < self._pixels:
                images[i] = self._img[k, 0]
        return images

    def _stage(self, ticket: SamplingTicket) -> str:  # type: ignore[override]
        # Some of its sequences hold slots (they leave at the next step) once not all of them are queued.
        return "queued" if ticket.queued == ticket.labels.size else "sampling"

    def _queues(self) -> Iterable[deque[_Sequence]]:
        return (self._queue,)

    def _admit(self, now: float) -> list[float]:
        """Let finished/abandoned sequences leave, then fill free slots from the queue; returns new joiners' waits."""
        keep = [
            k
            for k, (ticket, _) in enumerate(self._slots)
            if self._pos[k] < self._pixels and self._live(ticket, now)
        ]
        if len(keep) < len(self._slots):
            idx = np.asarray(keep, dtype=np.int64)
            m = idx.size
            for array in (self._img, self._label, self._pos, self._temp, self._guid, self._u, self._known,
                          self._fresh):
                array[:m] = array[idx]  # fancy indexing copies first, so overlapping moves are safe
            self.stepper.compact(idx)
            self._slots = [self._slots[k] for k in keep]
        waits: list[float] = []
        while self._queue and len(self._slots) < self.config.max_active:
            sequence = self._take(self._queue)
            ticket, i = sequence.ticket, sequence.index
            if not self._live(ticket, now):
                continue
            k = len(self._slots)
            self._slots.append((ticket, i))
            self._label[k] = ticket.labels[i]
            self._fresh[k] = True
            if ticket.given is None:
                self._img[k] = 0.0
                self._known[k] = False
                self._pos[k] = 0
            else:  # every known pixel in place; start at the first unknown one
                images, known = ticket.given
                self._known[k] = known[i]
                self._img[k, 0] = np.where(known[i].reshape(self._side, self._side), images[i], 0)
                self._pos[k] = int(np.argmin(known[i]))
            self._temp[k] = ticket.temperature
            any_digit = ticket.labels[i] == self.config.num_classes  # nothing to guide towards
            self._guid[k] = 0.0 if any_digit else ticket.guidance
            self._u[k] = ticket.u[i]
            waits.append(now - ticket.enqueued_at)
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
            for ticket in {s.ticket for s in self._queue} | {ticket for ticket, _ in self._slots}:
                self._fail(ticket, closed, "closed")
            self._queue.clear()
            self._queued = self._dropped_units = 0
            self._slots = []

    async def _step(self, waits: list[float]) -> None:
        loop = asyncio.get_running_loop()
        b, side = len(self._slots), self._side
        ar = np.arange(b)
        pos = self._pos[:b].copy()
        rows, cols = pos // side, pos % side
        guided = np.flatnonzero(self._guid[:b] > 0.0)  # these add an unconditional twin to the graphs' calls
        started = time.perf_counter()

        def run(graph: GraphFn, feeds: Arrays) -> asyncio.Future[Arrays]:
            return loop.run_in_executor(self._executor, graph, feeds)
        try:
            inputs = StepInputs(image=self._img, labels=self._label[:b], any_label=self.config.num_classes,
                                rows=rows, cols=cols, fresh=self._fresh[:b].copy(), guided=guided)
            logits = await self.stepper.logits(inputs, run, self.config.max_active)
            self._fresh[:b] = False
            step_logits = logits[:b]  # (b, 256); the twins' follow
            if guided.size:
                step_logits = step_logits.astype(np.float64)
                step_logits[guided] = guided_logits(step_logits[guided], logits[b:], self._guid[guided])
            values = sample_pixel(step_logits, self._u[ar, pos], self._temp[:b])
            values = np.where(self._known[ar, pos], self._img[ar, 0, rows, cols], values)  # given pixels stay
        except Exception as exc:
            logger.exception("sampler %r: step over %d sequences failed", self.name, b)
            for ticket in {ticket for ticket, _ in self._slots}:
                self._fail(ticket, exc, "error")  # they leave at the next _admit
            return
        compute_s = time.perf_counter() - started
        self._img[ar, 0, rows, cols] = values
        self._pos[:b] = pos + 1
        self.steps += 1
        self._notify("on_sampler_step", b)
        self._notify("on_batch", b, waits, compute_s)
        for k in np.flatnonzero(pos + 1 == self._pixels):
            ticket, i = self._slots[k]
            if ticket.future.done():
                continue
            ticket.images[i] = self._img[k, 0]
            ticket.remaining -= 1
            if ticket.remaining == 0:
                ticket.future.set_result(ticket.images)
                self._notify("on_items", ticket.labels.size)
