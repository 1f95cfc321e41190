# syntax=docker/dockerfile:1
# A GPU worker: NVIDIA's CUDA runtime image, torch built for that CUDA line, then the `worker` extra
# (transformers, accelerate, bitsandbytes for int8/nf4/fp4, peft).
#   docker build -f docker/worker.Dockerfile -t queueformer-worker .
# CUDA_IMAGE and TORCH_INDEX_URL go together: both name the same CUDA line (12.8 here), and the node's
# driver must support it (>= 570 for 12.8). For CUDA 13: CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
# and TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
# Ubuntu's Python (3.12 on 24.04). Package versions are not pinned: the CUDA base tag fixes the
# distribution release, and its point updates are security fixes we want.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY queueformer ./queueformer
COPY api ./api
COPY workers ./workers
# Versions follow pyproject.toml's ranges (the project has no lock file); to freeze them, add a
# constraints file to the build context and set PIP_CONSTRAINT.
RUN pip install --no-cache-dir "./[worker]"

FROM ${CUDA_IMAGE}
ARG UID=10001
ENV DEBIAN_FRONTEND=noninteractive
# Same Python as the build stage (the venv links to it); see above for why versions are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid "${UID}" queueformer \
    && useradd --system --uid "${UID}" --gid "${UID}" --home-dir /home/queueformer --create-home \
        --shell /usr/sbin/nologin queueformer \
    && mkdir -p /models/cache /models/local /data/storage \
    && chown -R "${UID}:${UID}" /models /data
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/queueformer-entrypoint
COPY --chmod=0755 docker/drain.py /usr/local/bin/queueformer-drain
# NVIDIA_* tell the NVIDIA container runtime which driver libraries to mount (the base image sets
# them too; repeated here because the worker depends on them).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
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
# and turns 503 when an engine failed fatally (e.g. CUDA errors), so the container gets restarted.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('QUEUEFORMER_WORKER__HEALTH_PORT', '9100'), timeout=4)"]
ENTRYPOINT ["/usr/local/bin/queueformer-entrypoint"]
# SIGTERM (docker stop, a pod's deletion) is Celery's warm shutdown: no new messages, in-flight ones
# finish. Give the container a stop timeout as long as the longest job.
CMD ["queueformer", "worker"]
