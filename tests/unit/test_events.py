"""service/routes/events.py: the Accept header, the event framing (read back by the client's parser), and the
progress loop fed a fake ticket: first event at once, progress only when it moved, keep-alive comments, the
result or error event last, and the ticket abandoned however the stream ends."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from starlette.requests import ClientDisconnect

from genserve_client.client import _EventParser
from service.batcher import BatcherClosed, DeadlineExceeded
from service.imaging import decode_images, encode_images
from service.routes.events import HEARTBEAT, EventStream, Pacing, event, progress_events, wants_event_stream

TOTAL = 2 * 4 * 4


class FakeTicket:
    """Two 4x4 images whose pixels are `done` so far; a test moves `done` and settles `answer`."""

    def __init__(self) -> None:
        self.done = 0
        self.abandoned = 0
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def progress(self) -> tuple[int, int]:
        return self.done, TOTAL

    def preview(self) -> np.ndarray:
        images = np.zeros(TOTAL, np.uint8)
        images[: self.done] = 255
        return images.reshape(2, 4, 4)

    def abandon(self) -> None:
        self.abandoned += 1
        if not self.answer.done():
            self.answer.cancel()

    async def result(self) -> bytes:
        return await self.answer


def parse(frames: list[bytes]) -> list[tuple[str, str] | str]:
    """The stream as the client reads it: (event, data) per event, and "comment" per comment line."""
    out: list[tuple[str, str] | str] = []
    parser = _EventParser()
    for line in b"".join(frames).decode().split("\n"):
        if line.startswith(":"):
            out.append("comment")
        elif (parsed := parser.feed(line)) is not None:
            out.append(parsed)
    return out


@pytest.mark.parametrize("accept, wanted", [
    ("text/event-stream", True),
    ("application/json, text/event-stream", True),
    ("Text/Event-Stream;q=0.5", True),
    ("text/event-stream; q=0", False),
    ("text/event-stream;q=zero", False),
    ("application/json", False),
    ("*/*", False),
    ("text/*", False),
    ("", False),
])
def test_accept_header(accept, wanted):
    assert wants_event_stream(accept) is wanted


def test_framing_round_trips_through_the_client_parser():
    frames = [event("progress", b'{"a": 1}'), HEARTBEAT, event("result", b"line one\nline two\r\nthree")]
    assert frames[0] == b'event: progress\ndata: {"a": 1}\n\n'
    assert parse(frames) == [("progress", '{"a": 1}'), "comment", ("result", "line one\nline two\nthree")]


def test_client_parser_follows_the_sse_rules():
    parser = _EventParser()
    lines = ["data:no space", "data:  two spaces", ": a comment", "id: 7", "", "", "event: x", "data", ""]
    assert [e for line in lines if (e := parser.feed(line)) is not None] == [
        ("message", "no space\n two spaces"), ("x", "")]


async def collect(events, ticket: FakeTicket, script) -> list[bytes]:
    """Every frame of `events`, calling `script(ticket, frames)` after each one (it moves the fake along)."""
    frames = []
    async for frame in events:
        frames.append(frame)
        await script(ticket, frames)
    return frames


def test_progress_then_result_and_keep_alive_while_nothing_moves():
    async def main():
        ticket = FakeTicket()
        pacing = Pacing(progress_interval_s=0.01, heartbeat_s=0.03)

        async def script(t: FakeTicket, frames: list[bytes]) -> None:
            if frames.count(HEARTBEAT) == 2 and t.done == 0:
                t.done = 5                          # moves after two keep-alives: one progress event
            elif frames[-1].startswith(b"event: progress"):
                if t.done == 5:
                    t.done = 9                      # moved again, at once: reported one interval later
                elif t.done == 9:
                    t.answer.set_result(b'{"images": []}')

        frames = await collect(progress_events(ticket, ticket.result, False, pacing), ticket, script)
        return ticket, frames

    ticket, frames = asyncio.run(main())
    events = parse(frames)
    assert events[0] == ("progress", json.dumps({"pixels_done": 0, "pixels_total": TOTAL}, separators=(",", ":")))
    assert events[1:3] == ["comment", "comment"]
    progress = [json.loads(e[1])["pixels_done"] for e in events if e[0] == "progress"]
    assert progress == [0, 5, 9]                     # once per change, none repeated
    assert events[-1] == ("result", '{"images": []}') and sum(e[0] == "result" for e in events) == 1
    assert ticket.abandoned == 1                     # settled: abandoning it now changes nothing


def test_preview_holds_the_partial_images_as_png():
    async def main():
        ticket = FakeTicket()
        ticket.done = 3
        ticket.answer.set_result(b"{}")
        return await collect(progress_events(ticket, ticket.result, True, Pacing(0.01, 1.0)), ticket, _idle)

    first = json.loads(parse(asyncio.run(main()))[0][1])
    images = decode_images(first["preview"], size=(4, 4))
    assert first["preview"] == encode_images(images, "png")
    assert images.shape == (2, 4, 4) and images.reshape(-1).tolist() == [255] * 3 + [0] * (TOTAL - 3)


async def _idle(ticket: FakeTicket, frames: list[bytes]) -> None:
    pass


@pytest.mark.parametrize("exc, status, code", [
    (DeadlineExceeded("late"), 504, "timeout"),
    (BatcherClosed("stopping"), 503, "shutting_down"),
    (RuntimeError("a bug"), 500, "internal"),
])
def test_a_failure_after_the_first_byte_is_an_error_event(exc, status, code):
    async def main():
        ticket = FakeTicket()

        async def script(t: FakeTicket, frames: list[bytes]) -> None:
            if len(frames) == 1:
                t.answer.set_exception(exc)

        return await collect(progress_events(ticket, ticket.result, False, Pacing(0.01, 1.0)), ticket, script)

    events = parse(asyncio.run(main()))
    assert [name for name, _ in events] == ["progress", "error"]
    body = json.loads(events[-1][1])
    assert body["status"] == status and body["error"]["code"] == code
    assert "a bug" not in events[-1][1]              # internal details stay in the log


def test_closing_the_stream_abandons_the_ticket_and_cancels_the_wait():
    async def main():
        ticket = FakeTicket()
        waiting = asyncio.Event()

        async def answer() -> bytes:
            waiting.set()
            return await ticket.answer

        events = progress_events(ticket, answer, False, Pacing(0.01, 1.0))
        assert (await anext(events)).startswith(b"event: progress")
        await waiting.wait()
        await events.aclose()                        # what a client that leaves amounts to
        return ticket

    ticket = asyncio.run(main())
    assert ticket.abandoned == 1 and ticket.answer.cancelled()


def test_event_stream_response_reports_a_client_that_left():
    """The response runs on_close, and says ClientDisconnect (-> 499) when the body never finished."""
    async def main(disconnect_after: int | None):
        sent, closed = [], []

        async def frames():
            for i in range(5):
                yield event("progress", str(i).encode())
                await asyncio.sleep(0.01)

        async def send(message):
            sent.append(message)

        async def receive():
            if disconnect_after is None:
                await asyncio.Event().wait()         # the client stays
            while sum(m["type"] == "http.response.body" for m in sent) < disconnect_after:
                await asyncio.sleep(0.001)
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
        response = EventStream(frames(), lambda: closed.append(True))
        try:
            await response(scope, receive, send)
        except ClientDisconnect:
            return sent, closed, True
        return sent, closed, False

    sent, closed, disconnected = asyncio.run(main(None))
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"cache-control"] == b"no-cache" and headers[b"x-accel-buffering"] == b"no"
    assert closed == [True] and not disconnected and sent[-1]["more_body"] is False
    sent, closed, disconnected = asyncio.run(main(2))
    assert closed == [True] and disconnected and len(sent) < 7
