"""``/v1/files``: OpenAI-compatible uploads (batch inputs, training data) and produced files."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from api.deps import ServicesDep, TenantDep
from queueformer.server.files import FileObject

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", response_model=FileObject, summary="Upload a JSONL file (purpose 'batch' or 'fine-tune')")
def upload(
    services: ServicesDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[Literal["batch", "fine-tune"], Form()],
) -> FileObject:
    name = file.filename or "upload.jsonl"
    return services.files.create(tenant, name, purpose, file.file, services.settings.quota.max_upload_bytes)


@router.get("", summary="List files, newest first")
def list_files(
    services: ServicesDep,
    tenant: TenantDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    after: str | None = None,
) -> dict[str, Any]:
    data, more = services.files.page(tenant, purpose, limit, after)
    return {
        "object": "list",
        "data": [f.model_dump() for f in data],
        "first_id": data[0].id if data else None,
        "last_id": data[-1].id if data else None,
        "has_more": more,
    }


@router.get("/{file_id}", response_model=FileObject, summary="A file's metadata")
def get_file(file_id: str, services: ServicesDep, tenant: TenantDep) -> FileObject:
    return services.files.get(file_id, tenant)


@router.delete("/{file_id}", summary="Delete a file")
def delete_file(file_id: str, services: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    return services.files.delete(file_id, tenant)


@router.get("/{file_id}/content", summary="A file's content", response_class=StreamingResponse)
def file_content(file_id: str, services: ServicesDep, tenant: TenantDep) -> StreamingResponse:
    services.files.get(file_id, tenant)
    key = services.files.key(file_id)
    size = services.storage.size(key)

    def chunks() -> Iterator[bytes]:
        with services.storage.open_read(key) as fh:
            while chunk := fh.read(1 << 20):
                yield chunk

    return StreamingResponse(chunks(), media_type="application/octet-stream", headers={"Content-Length": str(size)})
