"""python -m bench.bare: POST /v1/gan/sample with no web framework, a reference for floor 2.

Floor 2 compares GAN requests/s with the server's cheapest endpoint. This server does the GAN route's own work
the same way (model registry, batcher and its metrics, ONNX Runtime sessions and threads, seeded draws,
pixels, PNG, orjson) behind a bare ASGI callable on uvicorn with the service's settings, and leaves out what
FastAPI and the service add per request: routing, dependency injection, body validation, the HTTP middleware
and error mapping. It is one minimal server, not a bound on every server; the bench reports it next to the
floor (scenarios.gan). Only n=1 requests without labels, no error handling: a measuring instrument, not a
route to serve anyone.
"""

from __future__ import annotations

import asyncio
import os

import orjson
import uvicorn

from service.families.gan import draw, pixels, z_dim
from service.imaging import encode_images
from service.metrics import Metrics
from service.runtime import Registry
from service.settings import Settings, get_settings


class BareGan:
    """ASGI app: POST /v1/gan/sample {"seed": int}, GET /healthz, GET /readyz; anything else 404."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry: Registry | None = None

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.registry = Registry(self.settings, Metrics(multiprocess=False))
                await asyncio.to_thread(self.registry.load)
                await self.registry.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.registry is not None:
                    await self.registry.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _sample(self, receive) -> bytes:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        seed = int(orjson.loads(body)["seed"])
        mv = self.registry.get("gan", None, family="gan")
        labels, z = draw(seed, 1, z_dim(mv))
        out = await mv.run("generator", {"z": z, "label": labels})
        return orjson.dumps({"model": mv.name, "model_version": mv.version, "seed": seed, "labels": labels.tolist(),
                             "images": encode_images(pixels(out["image"]), "png")})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        status, payload = 404, b'{"error": "not found"}'
        if scope["path"] == "/v1/gan/sample" and scope["method"] == "POST":
            status, payload = 200, await self._sample(receive)
        elif scope["path"] == "/healthz":
            status, payload = 200, b'{"status":"ok"}'
        elif scope["path"] == "/readyz":
            ready = self.registry is not None and self.registry.ready
            status, payload = (200 if ready else 503), orjson.dumps({"ready": ready, "pid": os.getpid()})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def main() -> None:
    s = get_settings()
    uvicorn.run(BareGan(s), host=s.host, port=s.port, log_level=s.log_level, access_log=False, loop=s.loop,
                http=s.http, lifespan="on")


if __name__ == "__main__":
    main()
