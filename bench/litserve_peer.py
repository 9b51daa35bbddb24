"""python -m bench.litserve_peer: genserve's GAN sample and logprob work served by LitServe, the bench's peer.

The same ONNX graphs of the store, opened with genserve's session options (threads, spinning, graph
optimisation, providers), doing the same work per request as the service's routes: for POST /v1/gan/sample
{"seed": int} the seeded draw, the generator, the pixel conversion and genserve's PNG encoder (one image);
for POST /v1/pixelcnn/logprob {"images": [one base64 PNG]} genserve's image decoder, the logprob graph with
the "any digit" label, log p(x) in nats and bits/dim. Batching is LitServe's own: requests are collected by
its inference loop up to the manifest's max batch size, waiting at most `batch_timeout` seconds, and run as
one batch (LitAPI.batch / unbatch).

How LitServe runs it: this process binds the socket and supervises; each endpoint gets an inference worker
process holding its session; `GENSERVE_WORKERS` HTTP processes (1 by default, as genserve's one uvicorn
process) parse requests and pass them to the workers through multiprocessing queues. GENSERVE_HOST,
GENSERVE_PORT, GENSERVE_STORE_PATH and GENSERVE_LOG_LEVEL apply as for the service; GENSERVE_LITSERVE_BATCH_TIMEOUT_S
sets the collection window. A measuring instrument: only those two requests, no validation beyond what
genserve's decoder does. The bench starts it (scenarios.litserve); GET /readyz answers 200 once every
worker is ready.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import litserve as ls
import numpy as np

from service.families.gan import draw, pixels
from service.families.pixelcnn import logprob_inputs, logprob_results
from service.imaging import decode_images, encode_images
from service.runtime import session_factory
from service.settings import Settings, get_settings
from service.store import image_shape, read_manifest

ANY_DIGIT = 10  # the PixelCNN's label for "any digit", as the service's logprob route passes it
# LitServe's batch_timeout=0 polls its request queue without blocking: a busy loop taking a core per
# inference worker even when idle. A short window instead: the loop blocks on the queue between requests.
BATCH_TIMEOUT_S = float(os.environ.get("GENSERVE_LITSERVE_BATCH_TIMEOUT_S", "0.001"))


def newest_version(store: Path, model: str) -> Path:
    """The model's highest version folder: the version the service serves by default."""
    return max((p for p in (Path(store) / model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


class _OnnxApi(ls.LitAPI):
    """One graph of the newest version of a model, opened in LitServe's inference worker (setup)."""

    model = graph = path = ""

    def __init__(self, settings: Settings, batch_timeout_s: float = BATCH_TIMEOUT_S):
        self.settings = settings
        self.folder = newest_version(settings.store_path, self.model)
        self.manifest = read_manifest(self.folder)
        max_batch_size, _ = settings.batching_for(self.model, self.manifest.batching.max_batch_size,
                                                  self.manifest.batching.max_delay_ms)
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout_s, api_path=self.path)

    def setup(self, device) -> None:
        spec = self.manifest.graphs[self.graph]
        self.session = session_factory(self.settings)(self.folder / spec.file)
        self.output = spec.outputs[0].name
        for b in sorted({1, self.max_batch_size}):  # warm-up at the sizes genserve warms up
            self.run_graph(self.warmup_feeds(b))

    def run_graph(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output], feeds)[0]

    def warmup_feeds(self, b: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def reply(self, **fields) -> dict:
        return {"model": self.manifest.name, "model_version": self.manifest.version, **fields}


class GanSample(_OnnxApi):
    """POST /v1/gan/sample {"seed": int}: one seeded image, as base64 PNG."""

    model, graph, path = "gan", "generator", "/v1/gan/sample"

    def setup(self, device) -> None:
        self.z_dim = self.manifest.graphs["generator"].inputs[0].shape[1]
        super().setup(device)

    def warmup_feeds(self, b: int) -> dict[str, np.ndarray]:
        return {"z": np.zeros((b, self.z_dim), np.float32), "label": np.zeros(b, np.int64)}

    def decode_request(self, request):  # unannotated: LitServe reads the body with request.json(), no model
        seed = int(request["seed"])
        labels, z = draw(seed, 1, self.z_dim)  # (1,) int64, (1, z_dim) float32
        return seed, labels, z

    def batch(self, inputs: list) -> tuple[list[int], np.ndarray, np.ndarray]:
        seeds, labels, z = zip(*inputs, strict=True)
        return list(seeds), np.concatenate(labels), np.concatenate(z)

    def predict(self, x: tuple) -> tuple[list[int], np.ndarray, np.ndarray]:
        seeds, labels, z = x
        return seeds, labels, pixels(self.run_graph({"z": z, "label": labels}))  # images (B, 28, 28) uint8

    def unbatch(self, output: tuple) -> list[tuple[int, int, np.ndarray]]:
        seeds, labels, images = output
        return list(zip(seeds, labels.tolist(), images, strict=True))

    def encode_response(self, output):  # unannotated: no response model to validate against
        seed, label, image = output
        return self.reply(seed=seed, labels=[label], images=encode_images(image[None], "png"))


class Logprob(_OnnxApi):
    """POST /v1/pixelcnn/logprob {"images": [one base64 PNG]}: log p(x) in nats and bits per dimension."""

    model, graph, path = "pixelcnn", "logprob", "/v1/pixelcnn/logprob"

    def warmup_feeds(self, b: int) -> dict[str, np.ndarray]:
        images = np.zeros((b, *image_shape(self.manifest)), np.uint8)
        return logprob_inputs(images, np.full(b, ANY_DIGIT, np.int64))

    def decode_request(self, request):
        return decode_images(request["images"], size=image_shape(self.manifest))  # (1, H, W) uint8

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(inputs)  # (B, H, W)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.run_graph(logprob_inputs(images, np.full(len(images), ANY_DIGIT, np.int64)))  # (B, H, W) nats

    def unbatch(self, log_probs: np.ndarray) -> list[np.ndarray]:
        return list(log_probs[:, None])  # (1, H, W) each

    def encode_response(self, log_probs):  # the service's own totals and bits per dimension
        return self.reply(results=logprob_results({"log_probs": log_probs}, per_pixel=False))


def build(settings: Settings, batch_timeout_s: float = BATCH_TIMEOUT_S) -> ls.LitServer:
    apis = [GanSample(settings, batch_timeout_s), Logprob(settings, batch_timeout_s)]
    # accelerator="cpu" is only LitServe's device bookkeeping (one inference worker per endpoint); the
    # sessions run on whatever providers genserve's settings pick.
    return ls.LitServer(apis, accelerator="cpu", timeout=settings.request_timeout_s, healthcheck_path="/readyz")


def main() -> None:
    s = get_settings()
    server = build(s)
    # LitServe shuts its processes down on KeyboardInterrupt; SIGTERM (how the bench stops a server) would
    # otherwise end this process alone and leave its workers running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.run(host=s.host, port=s.port, num_api_servers=s.workers, log_level=s.log_level,
                   generate_client_file=False)
    except KeyboardInterrupt:
        pass
    finally:
        for child in multiprocessing.active_children():  # stopped before its workers were all up
            child.kill()


if __name__ == "__main__":
    main()
