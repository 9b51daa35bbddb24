# syntax=docker/dockerfile:1
# Serving image: the service and the shipped models, no torch. onnxruntime-gpu uses an NVIDIA GPU when the
# container gets one (docker run --gpus all), and its CPU provider otherwise.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GENSERVE_HOST=0.0.0.0 \
    GENSERVE_PORT=8000 \
    GENSERVE_STORE_PATH=/app/models_store

WORKDIR /app
RUN useradd --create-home --uid 10001 genserve

COPY pyproject.toml README.md ./
COPY service ./service
COPY training/__init__.py ./training/__init__.py
RUN pip install --no-cache-dir '.[serve]'

COPY models_store ./models_store

USER genserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status == 200 else 1)"]
CMD ["python", "-m", "service"]
