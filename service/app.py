"""The FastAPI application: settings injected, models loaded in the lifespan, routers per area.

Loading and warm-up run in the background after start-up, so /healthz answers at once and /readyz turns 200
only when every valid model is warm. On shutdown the batchers finish the work they accepted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from service import errors
from service.metrics import Metrics
from service.routes import gan, health, models, pixelcnn, v2, vae
from service.runtime import Registry
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)
API_VERSION = "1.0.0"


class BodyTooLarge(StarletteHTTPException):
    """Raised from inside receive() once a streamed body passes the limit. An HTTPException, because FastAPI's
    body reader re-raises those and turns any other exception into a generic 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds {limit} bytes")


class LimitsAndMetrics:
    """Pure ASGI middleware: refuses bodies over the limit with 413 (by Content-Length, or while streaming) and
    records every request's route template, status and duration. Metrics are a side channel: never raises."""

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    @staticmethod
    def _route(scope: Scope) -> str:
        """The matched route's template, which routing leaves in the scope; never the raw path, whose
        unbounded values would blow up the metric's label set."""
        route = scope.get("route")
        return getattr(route, "path", None) or "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500, "started": False}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        received = 0

        async def receive_wrapper():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        try:
            length = dict(scope.get("headers", [])).get(b"content-length")
            # at most 19 digits: int() of bytes refuses > 4300 digits, and no real body is near 10**19
            if length is not None and len(length) <= 19 and length.isdigit() and int(length) > self.limit:
                raise BodyTooLarge(self.limit)
            await self.app(scope, receive_wrapper, send_wrapper)
        except BodyTooLarge as exc:
            if not status["started"]:
                resp = errors.to_response(exc, v2=errors.is_v2_path(scope.get("path", "")))
                await resp(scope, receive, send_wrapper)
        finally:
            self.metrics.observe_request(self._route(scope), scope.get("method", ""), status["code"],
                                         time.perf_counter() - t0)


def create_app(settings: Settings | None = None, metrics: Metrics | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry = Registry(settings, metrics)
        app.state.registry = registry

        async def load():
            try:
                await asyncio.to_thread(registry.load)
                await registry.start()
                log.info("ready: %s", {n: sorted(v) for n, v in registry.models.items()})
            except Exception:
                log.exception("model loading failed; the service stays unready")

        task = asyncio.create_task(load())
        yield
        await task
        await registry.stop()

    app = FastAPIOffline(title="genserve", version=API_VERSION, lifespan=lifespan,
                         description="Generative image models (PixelCNN, VAE, GAN) over REST, on ONNX Runtime.")
    app.state.settings, app.state.metrics = settings, metrics
    errors.install(app)
    for r in (health.router, gan.router, pixelcnn.router, vae.router, models.router, v2.router, health.head_router):
        app.include_router(r)
    app.add_middleware(LimitsAndMetrics, limit=settings.max_body_bytes, metrics=metrics)
    return app
