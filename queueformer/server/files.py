"""Uploaded and produced files (``/v1/files``): metadata in Redis, content in storage."""

from __future__ import annotations

import json
import time
from typing import IO, Any, Literal, cast

import redis
from pydantic import BaseModel

from queueformer.contract.errors import InvalidInput, NotFound, PayloadTooLarge
from queueformer.contract.ids import new_id, valid_object_id
from queueformer.server import keys
from queueformer.server.storage import Storage

Purpose = Literal["batch", "fine-tune", "batch_output", "fine-tune-results"]
UPLOAD_PURPOSES = ("batch", "fine-tune")


class FileObject(BaseModel):
    """OpenAI's File object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileStore:
    """Create, read, list and delete files of a tenant."""

    def __init__(self, client: redis.Redis, storage: Storage) -> None:
        self.r = client
        self.storage = storage

    def create(self, tenant: str, filename: str, purpose: str, src: IO[bytes], max_bytes: int) -> FileObject:
        """Stream ``src`` into storage, refusing more than ``max_bytes``; the file exists only once complete."""
        file_id = new_id("file")
        size = 0
        with self.storage.open_write(self.storage.file_key(file_id)) as out:
            while chunk := src.read(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"file is larger than the upload limit of {max_bytes} bytes", param="file")
                out.write(chunk)
        return self._record(tenant, file_id, filename, purpose, size)

    def create_bytes(
        self, tenant: str, filename: str, purpose: str, data: bytes, expires_at: int | None = None
    ) -> FileObject:
        file_id = new_id("file")
        self.storage.put_bytes(self.storage.file_key(file_id), data)
        return self._record(tenant, file_id, filename, purpose, len(data), expires_at)

    def _record(
        self, tenant: str, file_id: str, filename: str, purpose: str, size: int, expires_at: int | None = None
    ) -> FileObject:
        obj = FileObject(
            id=file_id,
            bytes=size,
            created_at=int(time.time()),
            filename=filename[:255],
            purpose=purpose,
            expires_at=expires_at,
        )
        p = self.r.pipeline()
        p.hset(keys.file(file_id), mapping={"tenant": tenant, "object": obj.model_dump_json()})
        p.zadd(keys.tenant_files(tenant), {file_id: time.time()})
        p.execute()
        return obj

    def get(self, file_id: str, tenant: str | None) -> FileObject:
        if not valid_object_id(file_id):
            raise NotFound(f"file {file_id!r} not found", param="file_id")
        data = cast(dict[str, str], self.r.hgetall(keys.file(file_id)))
        if not data or (tenant is not None and data.get("tenant") != tenant):
            raise NotFound(f"file {file_id!r} not found", param="file_id")
        return FileObject.model_validate_json(data["object"])

    def tenant_of(self, file_id: str) -> str | None:
        return cast(str | None, self.r.hget(keys.file(file_id), "tenant"))

    def page(
        self, tenant: str, purpose: str | None = None, limit: int = 100, after: str | None = None
    ) -> tuple[list[FileObject], bool]:
        ids = cast(list[str], self.r.zrevrange(keys.tenant_files(tenant), 0, -1))
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1 :]
        out: list[FileObject] = []
        p = self.r.pipeline(transaction=False)
        for file_id in ids:
            p.hget(keys.file(file_id), "object")
        for raw in p.execute():
            if raw is None:
                continue
            obj = FileObject.model_validate_json(raw)
            if purpose is None or obj.purpose == purpose:
                out.append(obj)
            if len(out) > limit:
                break
        return out[:limit], len(out) > limit

    def delete(self, file_id: str, tenant: str) -> dict[str, Any]:
        self.get(file_id, tenant)
        self.storage.delete(self.storage.file_key(file_id))
        p = self.r.pipeline()
        p.delete(keys.file(file_id))
        p.zrem(keys.tenant_files(tenant), file_id)
        p.execute()
        return {"id": file_id, "object": "file", "deleted": True}

    def key(self, file_id: str) -> str:
        return self.storage.file_key(file_id)

    def resolve_uri(self, ref: str, tenant: str) -> str:
        """A training-data reference: an uploaded file id of this tenant, or a URI inside our storage."""
        if ref.startswith("file-"):
            self.get(ref, tenant)
            return self.storage.uri(self.key(ref))
        if "://" in ref:
            self.storage.key_of(ref)  # refuses anything outside our storage root
            return ref
        raise InvalidInput(f"{ref!r} is neither a file id nor a storage URI", param="training_file")


def dumps_lines(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for line in lines)
