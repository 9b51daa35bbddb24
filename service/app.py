"""The FastAPI application: settings injected, models loaded in the lifespan, routers per area.

The server accepts connections at once: loading runs as a task of its own, and its slow part (ONNX Runtime
sessions, warm-up) on a worker thread, so /healthz answers throughout. Until loading is over the registry
serves nothing and /readyz answers 503; then the whole set of models is published at once, and /readyz turns
200 if every required model has a version serving (warm). A model whose every version was refused keeps it at
503 while the others serve. On shutdown, loading is let finish, then the batchers finish the work they accepted.
With several workers, each one also applies the desired state of the control folder before it turns ready, then
watches it (service/repository.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service import __version__, errors, memory, openapi
from service.auth import Auth
from service.control import ControlFolder
from service.metrics import Metrics
from service.middleware import Admission, RequestGate
from service.repository import Repository
from service.routes import gan, health, models, pixelcnn, playground, v2, vae
from service.runtime import Registry
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def create_app(settings: Settings | None = None, metrics: Metrics | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry = Registry(settings, metrics)
        app.state.registry = registry
        # several workers: changes reach the others through the control folder (service/control.py)
        control = ControlFolder(settings.control_dir) if settings.workers > 1 and settings.control_dir else None
        app.state.repository = repository = Repository(registry, settings, control)
        background: list[asyncio.Task] = []  # poll mode's rescans, the control folder's watcher

        async def load():
            registry.startup.update(before_loading_s=_rounded(memory.process_age()),
                                    before_loading_rss_bytes=memory.rss_bytes())
            try:
                await repository.register()
                await asyncio.to_thread(registry.load)   # sessions and warm-up, the slow part: off the event loop
                await registry.start(ready=control is None)  # batchers start on this loop; the set is published
                if control is not None:                  # what the other workers were told since the run began
                    await repository.follow()
                    registry.ready = True
                registry.startup.update(ready_s=_rounded(memory.process_age()),
                                        ready_rss_bytes=memory.rss_bytes())
                # What loading made lives as long as the process: out of the collector's sight, a full collection
                # under load walks only the requests' objects (the loop's pauses it removed: docs/benchmarks.md).
                gc.freeze()
                log.info("ready: %s", {n: sorted(v) for n, v in registry.models.items()})
            except Exception:
                log.exception("model loading failed; the service stays unready")
                return
            if settings.model_control == "poll":
                background.append(asyncio.create_task(repository.poll_forever()))
            if control is not None:
                background.append(asyncio.create_task(repository.watch_forever()))

        task = asyncio.create_task(load())
        yield
        await task
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        repository.leave()
        await registry.stop()

    app = FastAPIOffline(title="genserve", version=__version__, lifespan=lifespan,
                         description="Generative image models (PixelCNN, VAE, GAN) over REST, on ONNX Runtime.")
    app.state.settings, app.state.metrics = settings, metrics
    app.state.auth = auth = Auth(settings, metrics)  # read by the request gate and by auth.require_admin
    errors.install(app)
    openapi.install(app)
    pages = [playground.router] if settings.playground else []
    for r in (health.router, gan.router, pixelcnn.router, vae.router, models.router, v2.router, *pages,
              health.head_router):
        app.include_router(r)
    app.state.admission = admission = Admission(metrics, settings.max_inflight, settings.max_loop_lag_s)
    app.add_middleware(RequestGate, limit=settings.max_body_bytes, metrics=metrics, admission=admission,
                       body_timeout_s=settings.body_timeout_s, auth=auth)
    return app
