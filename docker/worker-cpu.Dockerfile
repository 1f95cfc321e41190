# syntax=docker/dockerfile:1
# A CPU worker: Python slim, the CPU build of torch, then the `worker` extra. For the tiny offline
# models, small encoders and CI; GPU sets use worker.Dockerfile.
#   docker build -f docker/worker-cpu.Dockerfile -t queueformer-worker-cpu .
# Run: queueformer worker --queues <queue>... (or QUEUEFORMER_WORKER__QUEUES); health on :9100.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from PyTorch's CPU index: the worker extra's torch range is then already satisfied and
# pip never pulls the CUDA wheels (gigabytes) into a CPU image. Same order as `make setup`.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY queueformer ./queueformer
COPY api ./api
COPY workers ./workers
# Versions follow pyproject.toml's ranges (the project has no lock file); to freeze them, add a
# constraints file to the build context and set PIP_CONSTRAINT.
RUN pip install --no-cache-dir "./[worker]"

FROM ${PYTHON_IMAGE}
ARG UID=10001
# A numeric, unprivileged user; /models (the model cache volume) and /data belong to it so named
# volumes mounted there start out writable.
RUN groupadd --system --gid "${UID}" queueformer \
    && useradd --system --uid "${UID}" --gid "${UID}" --home-dir /home/queueformer --create-home \
        --shell /usr/sbin/nologin queueformer \
    && mkdir -p /models/cache /models/local /data/storage \
    && chown -R "${UID}:${UID}" /models /data
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/queueformer-entrypoint
COPY --chmod=0755 docker/drain.py /usr/local/bin/queueformer-drain
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/models/cache \
    QUEUEFORMER_MODELS_DIR=/models/local \
    QUEUEFORMER_DATA_DIR=/data \
    QUEUEFORMER_STORAGE_URL=file:///data/storage \
    QUEUEFORMER_WORKER__HEALTH_PORT=9100
VOLUME ["/models"]
WORKDIR /home/queueformer
USER 10001:10001
EXPOSE 9100
# /healthz answers once the models are loaded (loading big ones takes minutes, hence the start period)
# and turns 503 when an engine failed fatally.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('QUEUEFORMER_WORKER__HEALTH_PORT', '9100'), timeout=4)"]
ENTRYPOINT ["/usr/local/bin/queueformer-entrypoint"]
# SIGTERM (docker stop, a pod's deletion) is Celery's warm shutdown: no new messages, in-flight ones
# finish. Give the container a stop timeout as long as the longest job.
CMD ["queueformer", "worker"]
