# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target api    -t icr-api .     # HTTP API (pure API over Redis, or the embedded default)
#   docker build --target worker -t icr-worker .  # CUDA engine worker (`icr worker`)
# The shipped demo weights live in the package (service/weights/demo); mount another
# checkpoint directory and point ICR_WEIGHTS at it to serve your own.

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN useradd --create-home --uid 10001 icr

# ---- API: no GPU needed (it never runs a network in Redis mode) ----------------------
FROM base AS api
# Set PIP_EXTRA_INDEX_URL at build time to take a CPU-only torch wheel and keep the image small.
ARG PIP_EXTRA_INDEX_URL=
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install .
USER icr
ENV ICR_HOST=0.0.0.0 ICR_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["icr", "serve"]

# ---- Worker: CUDA runtime; torch's Linux wheels carry their own CUDA libraries -------
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS worker
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 ICR_DEVICE=cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/icr
ENV PATH=/opt/icr/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install .
RUN useradd --create-home --uid 10001 icr
USER icr
# SIGTERM: the worker finishes the job in hand, acknowledges it, then exits.
STOPSIGNAL SIGTERM
CMD ["icr", "worker"]
