"""FastAPI dependencies: the services and the calling tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.services import Services
from queueformer.contract.errors import Unauthorized
from queueformer.server.tenants import DEFAULT_TENANT


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


# Declares the bearer scheme in the OpenAPI document for every route that names the tenant; the key is
# checked below (auto_error off: with auth off a missing key is the default tenant, not a 403).
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An API key from `queueformer keys create`, sent as `Authorization: Bearer qf-...`.",
)


def get_tenant(
    request: Request,
    services: Annotated[Services, Depends(get_services)],
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The tenant of the Bearer key.

    With auth off (a single-user local cluster) a missing or unknown key means the default tenant, so
    SDKs that insist on some key (the OpenAI client does) work unchanged; issued keys still select
    their tenant. With auth on, a missing or unknown key is a 401.
    """
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    required = services.settings.api.auth_required
    if header and scheme.lower() == "bearer" and key.strip():
        tenant = services.keys.resolve(key.strip())
        if tenant is not None:
            return tenant
        if required:
            raise Unauthorized("invalid API key")
    elif required:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    return DEFAULT_TENANT


ServicesDep = Annotated[Services, Depends(get_services)]
TenantDep = Annotated[str, Depends(get_tenant)]
