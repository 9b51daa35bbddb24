# syntax=docker/dockerfile:1
# genserve serving image: the service, its shipped models (models_store/) and ONNX Runtime with the CUDA
# execution provider; no torch, no training code.
#
#   docker build -t genserve:0.1.0 .                             # GPU-capable (runs on CPU hosts too)
#   docker build -t genserve:0.1.0-cpu --build-arg CUDA_LIBS=0 .  # CPU only: no CUDA/cuDNN wheels (GBs)
#   docker run -p 8000:8000 genserve:0.1.0                       # CPU provider
#   docker run -p 8000:8000 --gpus all genserve:0.1.0            # CUDA provider (GENSERVE_PROVIDERS=auto)
#
# GPU approach. onnxruntime-gpu 1.31.1 is built against CUDA 13 and cuDNN 9, which it loads at run time only
# when a CUDA session is created. Rather than an nvidia/cuda:*-cudnn-runtime base image (another OS and Python,
# and CUDA/cuDNN versions to keep in step with onnxruntime-gpu by hand), the CUDA and cuDNN user-space
# libraries come as NVIDIA's pip wheels: the `cuda` and `cudnn` extras of onnxruntime-gpu itself, pinned in
# deploy/docker/requirements-cuda.txt, installed into the same venv; LD_LIBRARY_PATH points at them, so the
# dynamic loader finds them when ONNX Runtime opens its CUDA provider. The host
# supplies only the driver (>= 580 for CUDA 13): the NVIDIA Container Toolkit mounts libcuda.so.1 when the
# container is given a GPU. Without a GPU nothing CUDA is ever loaded: GENSERVE_PROVIDERS=auto picks CUDA only
# when a /dev/nvidia* device exists, so the same image serves on CPU.

# ---------------------------------------------------------------------------------------------- builder
FROM python:3.11.13-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first (pinned), so that code changes do not re-download them.
COPY deploy/docker/requirements.txt deploy/docker/requirements-cuda.txt /tmp/requirements/
RUN pip install --no-cache-dir --only-binary=:all: --requirement /tmp/requirements/requirements.txt
ARG CUDA_LIBS=1
RUN if [ "$CUDA_LIBS" = "1" ]; then \
        pip install --no-cache-dir --only-binary=:all: --requirement /tmp/requirements/requirements-cuda.txt; \
    fi

# The service itself, without dependencies (all pinned above).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install --no-cache-dir --no-deps . \
    && pip check

# ---------------------------------------------------------------------------------------------- runtime
# Same pinned base as the builder: the venv refers to /usr/local/bin/python3.11.
FROM python:3.11.13-slim-bookworm AS runtime

ARG PYTHON_SITE=/opt/venv/lib/python3.11/site-packages
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LD_LIBRARY_PATH=${PYTHON_SITE}/nvidia/cu13/lib:${PYTHON_SITE}/nvidia/cudnn/lib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    GENSERVE_HOST=0.0.0.0 \
    GENSERVE_PORT=8000 \
    GENSERVE_STORE_PATH=/app/models_store

# An unprivileged user with a fixed numeric id; code and models stay owned by root, read-only to it.
RUN groupadd --system --gid 10001 genserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin genserve

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY models_store ./models_store

USER 10001:10001
EXPOSE 8000
# Ready means every model is loaded and warm (503 before). start-period covers loading and warm-up.
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('GENSERVE_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=4).status == 200 else 1)"]
CMD ["python", "-m", "service"]
