"""``/v1/models``: what is registered, where it is queued, and what live workers actually loaded."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import ServicesDep, TenantDep
from api.errors import AUTHED, responses

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get(
    "",
    responses=responses(*AUTHED),
    summary="Registered models with their queue, quantization, device map and live workers",
)
def list_models(services: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    live = services.fleet.by_model()
    data = []
    for entry in services.registry():
        if entry.tenant is not None and entry.tenant != tenant:
            continue
        data.append(
            {
                "object": "model",
                "owned_by": entry.tenant or "queueformer",
                **entry.public(),
                "created": entry.created or services.registry_loaded_at,
                "workers": live.get(entry.name, []),
            }
        )
    return {"object": "list", "data": sorted(data, key=lambda d: d["id"])}
