"""``/v1/files``: OpenAI-compatible uploads (batch inputs, training data) and produced files."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from api.deps import ServicesDep, TenantDep
from api.errors import AUTHED, BODY, responses
from api.links import link, links
from queueformer.contract.openai_batch import EXPIRES_AFTER_MAX_S, EXPIRES_AFTER_MIN_S
from queueformer.server.files import FileObject

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post(
    "",
    responses=responses(*AUTHED, *BODY),
    openapi_extra=links(
        200,
        GetFile=link("/v1/files/{file_id}", "get", "file_id"),
        GetFileContent=link("/v1/files/{file_id}/content", "get", "file_id"),
        DeleteFile=link("/v1/files/{file_id}", "delete", "file_id"),
    ),
    response_model=FileObject,
    summary="Upload a JSONL file (purpose 'batch' or 'fine-tune')",
)
def upload(
    services: ServicesDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[Literal["batch", "fine-tune"], Form()],
    # Not nullable: a form field is a string, so an absent one is the only "none" (the schema says so too).
    anchor: Annotated[  # noqa: ARG001 - OpenAI sends it; created_at is the only anchor
        Literal["created_at"],  # noqa: RUF013
        Form(alias="expires_after[anchor]", description="OpenAI's expiry anchor: created_at (the default)."),
    ] = None,  # type: ignore[assignment]
    seconds: Annotated[
        int,  # noqa: RUF013
        Form(
            alias="expires_after[seconds]",
            ge=EXPIRES_AFTER_MIN_S,
            le=EXPIRES_AFTER_MAX_S,
            description="Delete the file this many seconds after upload (3600 to 2592000).",
        ),
    ] = None,  # type: ignore[assignment]
) -> FileObject:
    quota = services.settings.quota
    # created_at is the only anchor, so seconds alone mean the same; an anchor alone keeps the default expiry.
    ttl = seconds if seconds is not None else quota.file_expiry_s
    return services.files.create(
        tenant,
        file.filename or "upload.jsonl",
        purpose,
        file.file,
        quota.max_upload_bytes,
        quota_bytes=quota.max_stored_bytes,
        expires_after_s=ttl,
    )


@router.get("", responses=responses(*AUTHED, 422), summary="List files, newest first")
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


@router.get(
    "/{file_id}", responses=responses(*AUTHED, 404, 422), response_model=FileObject, summary="A file's metadata"
)
def get_file(file_id: str, services: ServicesDep, tenant: TenantDep) -> FileObject:
    return services.files.get(file_id, tenant)


@router.delete("/{file_id}", responses=responses(*AUTHED, 404, 422), summary="Delete a file")
def delete_file(file_id: str, services: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    return services.files.delete(file_id, tenant)


@router.get(
    "/{file_id}/content",
    responses=responses(*AUTHED, 404, 422),
    summary="A file's content",
    response_class=StreamingResponse,
)
def file_content(file_id: str, services: ServicesDep, tenant: TenantDep) -> StreamingResponse:
    services.files.get(file_id, tenant)
    key = services.files.key(file_id)
    size = services.storage.size(key)

    def chunks() -> Iterator[bytes]:
        with services.storage.open_read(key) as fh:
            while chunk := fh.read(1 << 20):
                yield chunk

    return StreamingResponse(chunks(), media_type="application/octet-stream", headers={"Content-Length": str(size)})
