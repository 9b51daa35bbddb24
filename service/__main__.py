"""python -m service: serve the model store with uvicorn, settings from GENSERVE_* environment variables."""

from __future__ import annotations

import logging
import os
import tempfile

import uvicorn

from service.settings import get_settings


def main() -> None:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # several processes: prometheus-client must aggregate through files, set before it is imported
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="genserve-metrics-")
    uvicorn.run("service.app:create_app", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level=settings.log_level, access_log=False)


if __name__ == "__main__":
    main()
