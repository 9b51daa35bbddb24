"""Server-sent events (text/event-stream) for work that reports its progress: the framing, the loop that turns a
ticket's progress and its final answer into events, and the response that carries them.

A stream is: one `progress` event at once (so the client sees the stream is live), then another whenever the
work has moved on, at most every `Pacing.progress_interval_s`; a `: keep-alive` comment whenever nothing was sent
for `Pacing.heartbeat_s` (a request waiting in the queue says nothing for a while, and proxies close idle
connections); and exactly one last event: `result` with the JSON body the plain request would get, or `error`
with the usual error body and its status (service/errors.py) when the work fails after the status line went out.
Whatever ends the stream, the client leaving included, the ticket is abandoned: work nobody reads is dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import orjson
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from service import errors
from service.imaging import encode_images

EVENT_STREAM = "text/event-stream"
HEARTBEAT = b": keep-alive\n\n"


def wants_event_stream(accept: str) -> bool:
    """Whether an Accept header lists text/event-stream with a quality above 0 (`*/*` does not count)."""
    for media_range in accept.split(","):
        media_type, *params = (part.strip() for part in media_range.split(";"))
        if media_type.lower() != EVENT_STREAM:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0  # a malformed weight asks for nothing
        if quality > 0:
            return True
    return False


def event(name: str, data: bytes) -> bytes:
    """One event: its name, then its data as one `data:` line per line of it, ended by a blank line."""
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return b"event: " + name.encode() + b"\n" + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


class Watched(Protocol):
    """What the loop reads of a ticket (service.sampler.SamplingTicket is one)."""

    def progress(self) -> tuple[int, int]:
        """(units done, units in all)"""

    def preview(self) -> np.ndarray:
        """(n, H, W) uint8: the partial images"""

    def abandon(self) -> None:
        """Drop the work: nobody will read its answer."""


@dataclass(frozen=True)
class Pacing:
    progress_interval_s: float  # the least time between two progress events
    heartbeat_s: float  # the longest silence


def _progress(ticket: Watched, preview: bool) -> tuple[int, bytes]:
    done, total = ticket.progress()
    data: dict = {"pixels_done": done, "pixels_total": total}
    if preview:
        data["preview"] = encode_images(ticket.preview(), "png")
    return done, event("progress", orjson.dumps(data))


def _error(exc: Exception) -> bytes:
    status, body = errors.status_and_body(exc)
    return event("error", orjson.dumps({"status": status, **body}))


async def progress_events(ticket: Watched, answer: Callable[[], Awaitable[bytes]], preview: bool,
                          pacing: Pacing) -> AsyncIterator[bytes]:
    """The events of `ticket`'s work, whose final JSON body `answer()` gives (awaiting the ticket)."""
    loop = asyncio.get_running_loop()
    work = asyncio.ensure_future(answer())
    try:
        last_done, frame = _progress(ticket, preview)
        yield frame
        sent_at = checked_at = loop.time()
        while not work.done():
            due = min(checked_at + pacing.progress_interval_s, sent_at + pacing.heartbeat_s)
            await asyncio.wait((work,), timeout=max(0.0, due - loop.time()))
            if work.done():
                break
            now = loop.time()
            if now >= checked_at + pacing.progress_interval_s:
                checked_at = now
                if ticket.progress()[0] != last_done:
                    last_done, frame = _progress(ticket, preview)
                    sent_at = now
                    yield frame
                    continue
            if now >= sent_at + pacing.heartbeat_s:
                sent_at = now
                yield HEARTBEAT
        try:
            body = work.result()
        except Exception as exc:  # its status line is long gone: the error is an event
            yield _error(exc)
        else:
            yield event("result", body)
    finally:  # also when the client left (this generator cancelled or closed)
        # The ticket first: cancelling the task would cancel the future it awaits, and an abandoned ticket whose
        # future is already settled is not counted as a cancellation.
        ticket.abandon()
        work.cancel()


class EventStream(StreamingResponse):
    """A text/event-stream response that no proxy buffers (X-Accel-Buffering for nginx) or caches. `on_close`
    runs however the stream ends; when it ends because the client left, ClientDisconnect is raised after it, so
    the request is logged as 499 like a plain request whose client left."""

    media_type = EVENT_STREAM

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        finished = False

        async def sending(message: Message) -> None:
            nonlocal finished
            await send(message)
            finished = message["type"] == "http.response.body" and not message.get("more_body", False)

        try:
            # Starlette cancels the body's iteration when the server reports http.disconnect
            await super().__call__(scope, receive, sending)
        finally:
            self._on_close()
        if not finished:
            raise ClientDisconnect()


def event_stream(ticket: Watched, answer: Callable[[], Awaitable[bytes]], preview: bool,
                 pacing: Pacing) -> EventStream:
    """The streamed answer of work already admitted (`ticket`): see progress_events."""
    return EventStream(progress_events(ticket, answer, preview, pacing), ticket.abandon)
