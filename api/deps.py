"""FastAPI dependencies: the services and the calling tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.services import Services
from queueformer.errors import Unauthorized
from queueformer.tenants import DEFAULT_TENANT


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_tenant(request: Request, services: Annotated[Services, Depends(get_services)]) -> str:
    """The tenant of the Bearer key; without a key, the default tenant unless auth is required."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if header and scheme.lower() == "bearer" and key.strip():
        tenant = services.keys.resolve(key.strip())
        if tenant is None:
            raise Unauthorized("invalid API key")
        return tenant
    if services.settings.api.auth_required:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    return DEFAULT_TENANT


ServicesDep = Annotated[Services, Depends(get_services)]
TenantDep = Annotated[str, Depends(get_tenant)]
