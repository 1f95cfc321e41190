# syntax=docker/dockerfile:1
# The HTTP API: Python slim with the `api` extra only. No torch, no transformers, no worker code: the
# image stays small and the API process can never load a model.
#   docker build -f docker/api.Dockerfile -t queueformer-api .
# The `flower` target is the same runtime plus Flower (the Celery dashboard), for compose and Helm:
#   docker build -f docker/api.Dockerfile --target flower -t queueformer-flower .
# Secrets (Redis URL, API keys, Flower credentials) come at run time from env or /run/secrets files,
# never from the image.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY queueformer ./queueformer
COPY api ./api
# Versions follow pyproject.toml's ranges (the project has no lock file); to freeze them, add a
# constraints file to the build context and set PIP_CONSTRAINT.
RUN pip install --no-cache-dir "./[api]"

FROM build AS flower-build
ARG FLOWER_VERSION=2.2.0
RUN pip install --no-cache-dir "flower==${FLOWER_VERSION}"

FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
# A numeric, unprivileged user: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid "${UID}" queueformer \
    && useradd --system --uid "${UID}" --gid "${UID}" --home-dir /home/queueformer --create-home \
        --shell /usr/sbin/nologin queueformer \
    && mkdir -p /data/storage \
    && chown -R "${UID}:${UID}" /data
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/queueformer-entrypoint
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    QUEUEFORMER_DATA_DIR=/data \
    QUEUEFORMER_STORAGE_URL=file:///data/storage
WORKDIR /home/queueformer
ENTRYPOINT ["/usr/local/bin/queueformer-entrypoint"]

FROM runtime AS flower
COPY --from=flower-build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 5555
# /healthcheck answers without credentials; everything else needs FLOWER_BASIC_AUTH (set at run time).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:5555/healthcheck', timeout=4)"]
# The broker is CELERY_BROKER_URL, which the entrypoint derives from QUEUEFORMER_REDIS_URL.
CMD ["celery", "flower", "--port=5555"]

FROM runtime AS api
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "20"]
