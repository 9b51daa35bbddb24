"""The ASGI layer in front of the routes: API keys, admission control, the body limit, request deadlines, the
last-resort 500, and the request metrics. Pure ASGI (no BaseHTTPMiddleware): it runs on every request, so it
stays cheap.

API keys (service.auth) are checked first, before admission and before the body is read: a request without a
valid key takes no in-flight slot and costs no body read or parsing.

Admission: a request that carries work (POST) is admitted only while fewer than `max_inflight` requests to the
same path are in flight in this process, and while the event loop keeps up (LoopLag); past that it is answered
503 + Retry-After at once, before its body is read, so that an overloaded server spends little on the work it
refuses and the work it accepts waits a bounded time. Per path, so that a crowd of slow sampling requests cannot
lock out the fast routes. Probes, metrics and metadata (GET, HEAD) are never refused: a load balancer must see an
overloaded replica as alive. The server's protocol asks the same Admission before the app runs at all, and
answers its refusals itself (service.protocol); this gate asks again for servers without that protocol.

Deadlines count from arrival: the batcher and the sampler read `arrived_at`, set here.

An exception no handler took becomes a logged 500 here, not in Starlette's ServerErrorMiddleware: that one
re-raises after answering, and uvicorn then closes the connection without having said `Connection: close`, so a
pooled client lost its next request on that connection.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors
from service.auth import Auth
from service.batcher import QueueFull, arrived_at
from service.metrics import Metrics


class BodyTooLarge(StarletteHTTPException):
    """Raised from inside receive() once a streamed body passes the limit. An HTTPException, because FastAPI's
    body reader re-raises those and turns any other exception into a generic 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds {limit} bytes")


class BodyTimeout(StarletteHTTPException):
    """Raised from inside receive() when the body has not arrived in time. The rest of it may still be on its
    way, so the connection cannot carry another request: the response says so."""

    def __init__(self, timeout_s: float):
        super().__init__(408, f"request body did not arrive within {timeout_s:g} s", {"Connection": "close"})


def _route(scope: Scope) -> str:
    """The matched route's template, which routing leaves in the scope; never the raw path, whose unbounded
    values would blow up the metric's label set."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        # at most 19 digits: int() of bytes refuses > 4300 digits, and no real body is near 10**19
        if name == b"content-length" and len(value) <= 19 and value.isdigit():
            return int(value)
    return None


class LoopLag:
    """How late the event loop runs a timer, measured every PERIOD_S: how long work that is ready waits before the
    loop gets to it. That includes requests whose bytes have arrived but which the loop has not read yet, which no
    queue in the app can see: the loop reads every ready socket once per turn, so a busy turn delays them all.

    `lag_s` is the least lateness of the last SUSTAIN ticks: an overloaded loop is late at every tick, while one
    long stall (a warm-up, a garbage collection) makes one tick late and says nothing of the load."""

    PERIOD_S = 0.01
    SUSTAIN = 3

    def __init__(self) -> None:
        self._late: deque[float] = deque([0.0], maxlen=self.SUSTAIN)
        self._timer: asyncio.TimerHandle | None = None

    @property
    def lag_s(self) -> float:
        return min(self._late)

    def start(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + self.PERIOD_S, self._tick, loop, loop.time() + self.PERIOD_S)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        now = loop.time()
        self._late.append(max(0.0, now - due))
        self._timer = loop.call_at(now + self.PERIOD_S, self._tick, loop, now + self.PERIOD_S)


STATE_KEY = "genserve.admission"  # where the lifespan state carries the Admission to the server's protocol


class Admission:
    """Which POST requests this process takes now: fewer than `max_inflight` in flight on their path, and an event
    loop no further than `max_loop_lag_s` behind. The request gate asks it for every request; the server's
    protocol (service.protocol) asks it too, as soon as a request's headers are parsed, and answers a refusal
    without running the app at all: at three times its capacity a process spends most of its time refusing."""

    def __init__(self, metrics: Metrics, max_inflight: int, max_loop_lag_s: float = math.inf):
        self.metrics, self.max_inflight, self.max_loop_lag_s = metrics, max_inflight, max_loop_lag_s
        self.inflight: dict[str, int] = {}  # path -> admitted requests not yet answered; no entry at zero
        self.total_inflight = 0
        self.lag = LoopLag()
        self._refusals = {v2: _refusal_bytes(v2) for v2 in (False, True)}

    def refusal(self, method: str, path: str) -> str | None:
        """Why a request must be refused now (counted in the metrics), or None."""
        if method != "POST":
            return None
        if (held := self.inflight.get(path, 0)) >= self.max_inflight:
            self.metrics.on_shed("inflight")
            return f"{held} requests to {path} in flight, the most this process admits"
        if (lag := self.lag.lag_s) > self.max_loop_lag_s:
            self.metrics.on_shed("loop_lag")
            return f"the event loop runs {lag * 1000:.0f} ms behind"
        return None

    def enter(self, path: str) -> None:
        self.inflight[path] = self.inflight.get(path, 0) + 1
        self.total_inflight += 1
        self.metrics.set_inflight(self.total_inflight)

    def leave(self, path: str) -> None:
        if (left := self.inflight[path] - 1) > 0:
            self.inflight[path] = left
        else:
            del self.inflight[path]
        self.total_inflight -= 1
        self.metrics.set_inflight(self.total_inflight)

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An ASGI app answering the 503 of a refused request, for the protocol's fast path: the same status,
        headers and body as errors.to_response gives a QueueFull, without the app's stack."""
        t0 = time.perf_counter()
        headers, body = self._refusals[errors.is_v2_path(scope["path"])]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self.metrics.observe_request("refused", scope["method"], 503, time.perf_counter() - t0)


def _refusal_bytes(v2: bool) -> tuple[list[tuple[bytes, bytes]], bytes]:
    response = errors.to_response(QueueFull("refused by admission control"), v2=v2)
    return response.raw_headers, response.body


class RequestGate:
    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics, admission: Admission, body_timeout_s: float,
                 auth: Auth | None = None):
        self.app, self.limit, self.metrics, self.admission = app, limit, metrics, admission
        self.body_timeout_s = body_timeout_s
        self.auth = auth if auth is not None and auth.keys_on else None  # without keys, not even a call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                scope.setdefault("state", {})[STATE_KEY] = self.admission  # for the server's protocol
                self.admission.lag.start()
                try:
                    await self.app(scope, receive, send)
                finally:
                    self.admission.lag.stop()
                return
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        arrival = asyncio.get_running_loop().time()
        arrived_at.set(arrival)
        state = {"status": 500, "started": False}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            await send(message)

        received, body_done = 0, False

        async def receive_wrapper() -> Message:
            nonlocal received, body_done
            if body_done:  # later calls only wait for a disconnect: no deadline on those
                return await receive()
            try:
                async with asyncio.timeout_at(arrival + self.body_timeout_s):
                    message = await receive()
            except TimeoutError:
                self.metrics.on_client_timeout("body")
                raise BodyTimeout(self.body_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
                body_done = not message.get("more_body", False)
            return message

        admitted: str | None = None  # the path counted in self.inflight
        try:
            if self.auth is not None:
                self.auth.check(scope)
            if scope["method"] == "POST":
                if (why := self.admission.refusal("POST", scope["path"])) is not None:
                    raise QueueFull(why)
                self.admission.enter(admitted := scope["path"])
            if (length := _declared_length(scope)) is not None and length > self.limit:
                raise BodyTooLarge(self.limit)
            await self.app(scope, receive_wrapper, send_wrapper)
        except ClientDisconnect:  # the client left while sending its body: nobody to answer
            state["status"] = 499
        except Exception as exc:  # errors.to_response logs what it does not know
            if state["started"]:
                raise  # half a response is out: only closing the connection can tell the client
            await errors.to_response(exc, v2=errors.is_v2_path(scope.get("path", "")))(scope, receive, send_wrapper)
        finally:
            if admitted is not None:
                self.admission.leave(admitted)
            self.metrics.observe_request(_route(scope), scope["method"], state["status"], time.perf_counter() - t0)
