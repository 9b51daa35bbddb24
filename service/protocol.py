"""uvicorn's HTTP/1.1 protocols with a header timeout: a client that is slow to send its request line and headers
is cut off, as nginx's client_header_timeout does.

uvicorn has no such timeout: a connection that sends its headers a byte at a time (or nothing at all) is held for
ever, and a thousand of them use up the process's file descriptors, after which nothing answers, /healthz
included. The clock starts when the connection is accepted, or at the first byte of a request on a kept-alive
one, and stops when the headers are complete. Past it the client gets a 408 with `Connection: close`, and the
connection is closed. Idle kept-alive connections stay uvicorn's business
(timeout_keep_alive). The body has a timeout of its own, in the request gate (service.middleware), which
answers it through the app.

The classes are referred to by name (`service.protocol:GuardedHttpToolsProtocol`), since uvicorn's worker
processes are spawned and re-import them; the timeout comes from the settings each process reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.middleware import STATE_KEY
from service.settings import get_settings

log = logging.getLogger(__name__)


def _timeout_response() -> bytes:
    body = orjson.dumps({"error": {"code": "request_timeout", "message": "request headers took too long to arrive"}})
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))


class SlowClientGuard:
    """Mixin for a uvicorn HTTP protocol: the header timeout. Reads the protocol's `transport` and `cycle`
    (the request being answered; None before the first)."""

    # Called with the phase ("headers") each time a client is cut off: the metrics, set by the worker's app.
    observer: Callable[[str], None] | None = None
    header_timeout_s: float | None = None  # None: the settings' (a subclass may fix it, as tests do)
    _RESPONSE = _timeout_response()

    transport: asyncio.Transport
    cycle: Any

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle_before = self.cycle
        super().data_received(data)  # type: ignore[misc]
        if self._waiting_for_headers():
            if self._header_timer is None:  # the first byte of a request on a kept-alive connection
                self._arm()
        elif self.cycle is not cycle_before or self._header_timer is not None:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _waiting_for_headers(self) -> bool:
        """No request parsed on this connection yet, or the last one answered and the next not parsed."""
        return not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)

    def _arm(self) -> None:
        timeout = self.header_timeout_s or get_settings().header_timeout_s
        self._header_timer = asyncio.get_running_loop().call_later(timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if not self._waiting_for_headers():
            return
        self.transport.write(self._RESPONSE)
        self.transport.close()
        if (observer := type(self).observer) is not None:
            try:
                observer("headers")
            except Exception:  # metrics never cost a connection
                log.warning("client timeout observer failed", exc_info=True)


class GuardedH11Protocol(SlowClientGuard, H11Protocol):
    pass


try:
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(SlowClientGuard, HttpToolsProtocol):
        """With admission's fast path: a request the process will not take is answered by Admission.refuse as
        soon as its headers are parsed, instead of by the app's whole stack (h11 leaves it to the app)."""

        def on_headers_complete(self) -> None:
            admission = self.app_state.get(STATE_KEY)
            if admission is not None:
                path = httptools.parse_url(self.url).path.decode("ascii", "replace")
                if admission.refusal(self.parser.get_method().decode("ascii", "replace"), unquote(path)):
                    app, self.app = self.app, admission.refuse  # this request's app, chosen below
                    try:
                        super().on_headers_complete()
                    finally:
                        self.app = app
                    return
            super().on_headers_complete()

except ImportError:  # httptools is an optional extra of uvicorn
    GuardedHttpToolsProtocol = None  # type: ignore[assignment,misc]


def protocol_name(http: str) -> str:
    """The import string of the guarded protocol for the `http` setting (auto: httptools where installed)."""
    if http == "h11" or (http == "auto" and GuardedHttpToolsProtocol is None):
        return "service.protocol:GuardedH11Protocol"
    if GuardedHttpToolsProtocol is None:
        raise RuntimeError("GENSERVE_HTTP=httptools but httptools is not installed")
    return "service.protocol:GuardedHttpToolsProtocol"
