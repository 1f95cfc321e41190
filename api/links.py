"""OpenAPI links: which operations take the id a create answers with.

Clients (and schemathesis's stateful phase) follow them from ``POST /v1/files`` to the file's routes,
from ``POST /v1/jobs`` to the job's, and so on. The job event stream is left out: it stays open while
the job runs.
"""

from __future__ import annotations

from typing import Any


def link(path: str, method: str, param: str) -> dict[str, Any]:
    """A link to ``method path`` whose ``param`` is the created object's ``id``."""
    ref = "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method
    return {"operationRef": ref, "parameters": {param: "$response.body#/id"}}


def links(status: int, **named: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` adding ``named`` links to the ``status`` response."""
    return {"responses": {str(status): {"links": named}}}
