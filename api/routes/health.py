"""Process health: liveness, readiness (Redis and storage answer) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api import metrics
from api.deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The API process is alive")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Redis and storage answer")
def readyz(services: ServicesDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        services.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {exc}"
    try:
        services.storage.exists("files/.probe")
        checks["storage"] = "ok"
    except Exception as exc:
        checks["storage"] = f"error: {exc}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(status_code=200 if ok else 503, content={"status": "ready" if ok else "not ready", **checks})


@router.get(
    "/metrics",
    summary="Prometheus metrics of the whole cluster: this API and every live worker",
    response_class=Response,
)
def prometheus(services: ServicesDep) -> Response:
    metrics.refresh_queue_depths(services)
    body = generate_latest(metrics.REGISTRY) + generate_latest(metrics.cluster_registry(services.redis))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
