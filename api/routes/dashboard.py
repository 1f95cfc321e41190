"""The batch dashboard: the page at ``/ui`` and the two JSON routes it adds to the public ones.

The page itself holds no data (it asks for an API key and calls the API like any client), so it is
served without auth. ``/v1/dashboard`` and ``/v1/dashboard/history`` are scoped like every other
route: batches, jobs and models are the caller's tenant's; queue depths and live workers are the
cluster's, which every tenant shares.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import RedirectResponse, Response

from api.deps import ServicesDep, TenantDep
from api.errors import AUTHED, responses
from api.history import History, queue_depths
from api.services import Services
from queueformer.contract.errors import NotFound
from queueformer.contract.registry import ModelEntry

router = APIRouter(tags=["dashboard"])

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Everything comes from this origin: no CDN, no inline script, nothing framed.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=len(ASSETS))
def _asset(name: str) -> bytes:
    return resources.files("api").joinpath("ui", name).read_bytes()


@router.get("/ui", include_in_schema=False)
def ui_root() -> RedirectResponse:
    # Relative links from /ui/ reach the assets and ../v1, also behind a proxy that mounts the API on a path.
    return RedirectResponse("ui/", status_code=307)


@router.get("/ui/", include_in_schema=False)
def ui_page() -> Response:
    return ui_asset("index.html")


@router.get("/ui/{name}", include_in_schema=False)
def ui_asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound(f"no dashboard file {name!r}")
    return Response(_asset(name), media_type=ASSETS[name], headers=HEADERS)


def _visible(services: Services, tenant: str) -> list[ModelEntry]:
    return [e for e in services.registry() if e.tenant is None or e.tenant == tenant]


def _now(services: Services) -> float:
    secs, micros = services.redis.time()
    return secs + micros / 1e6


def _history(services: Services) -> History:
    return History(services.redis, services.settings.api.history_interval_s)


@router.get(
    "/v1/dashboard", responses=responses(*AUTHED), summary="Extension: the dashboard's summary for the caller's tenant"
)
def dashboard(services: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    """Open batches and recent states of the tenant's work, its models' live workers and throughput, queue depths."""
    registry = services.registry()
    entries = _visible(services, tenant)
    now = _now(services)
    interval = services.settings.api.history_interval_s
    # The newest rate counts as current only while samples keep coming.
    recent = now - 3 * max(interval, 1.0)
    rates = _history(services).token_rates([e.name for e in entries], recent) if interval > 0 else {}
    live = services.fleet.by_model()
    members = services.fleet.members()
    depths = queue_depths(services.redis, registry.queues())
    batches, _ = services.batches.page(tenant, None, 100)
    jobs = services.jobs.recent(tenant, 100)
    models = []
    for e in sorted(entries, key=lambda e: e.name):
        workers = live.get(e.name, [])
        points = rates.get(e.name, [])
        models.append(
            {
                "model": e.name,
                "task": e.task.value,
                "queue": e.queue,
                "workers": len(workers),
                "ready_workers": sum(1 for w in workers if w.get("ready")),
                "tokens_per_s": round(points[-1][1], 2) if points else 0.0,
                "lines_per_s": round(sum(float(w.get("lines_per_s") or 0) for w in workers), 2),
            }
        )
    queues = [
        {
            "queue": q,
            "depth": depth,
            "models": sorted(e.name for e in entries if e.queue == q),
            "workers": sum(1 for m in members if q in (m.get("queues") or [])),
        }
        for q, depth in depths.items()
    ]
    return {
        "object": "dashboard",
        "tenant": tenant,
        "time": now,
        "auth_required": services.settings.api.auth_required,
        "history_interval_s": interval,
        "batches": {
            "open": services.batches.open_count(tenant),
            "by_status": dict(Counter(b.get("status", "") for b in batches)),
        },
        "jobs": {"by_state": dict(Counter(j.state.value for j in jobs))},
        "workers": len(members),
        "models": models,
        "queues": queues,
    }


@router.get(
    "/v1/dashboard/history",
    responses=responses(*AUTHED, 422),
    summary="Extension: queue depths and tokens/s over the last hour",
)
def dashboard_history(
    services: ServicesDep, tenant: TenantDep, minutes: Annotated[int, Query(ge=1, le=60)] = 60
) -> dict[str, Any]:
    """Samples taken every ``history_interval_s`` by the API: depth per queue, tokens/s per model of this tenant."""
    now = _now(services)
    since = now - minutes * 60
    history = _history(services)
    depths = history.queue_depths(services.registry().queues(), since)
    rates = history.token_rates([e.name for e in _visible(services, tenant)], since)
    return {
        "object": "dashboard.history",
        "time": now,
        "since": since,
        "interval_s": services.settings.api.history_interval_s,
        "queue_depth": {q: [[round(t, 3), v] for t, v in pts] for q, pts in depths.items()},
        "tokens_per_s": {m: [[round(t, 3), round(v, 3)] for t, v in pts] for m, pts in rates.items()},
    }
