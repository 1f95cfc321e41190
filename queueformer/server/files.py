"""Uploaded and produced files (``/v1/files``): metadata in Redis, content in storage.

Every file belongs to one tenant and counts against that tenant's storage quota from the moment it
is recorded until it is deleted or expires (reserving the bytes and recording the file are one Redis
step, and so are dropping the record and giving the bytes back, so a race never counts a file twice).
A file past its ``expires_at`` answers 404 at once; the API's upkeep sweeps it out of storage later.
Training data for fine-tunes comes through :class:`TrainingData`: a tenant's own fine-tune files, or
URIs under prefixes the operator allows, checked when a job is accepted and again before a worker reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any, Literal, cast

import fsspec
import redis
from pydantic import BaseModel

from queueformer.contract.errors import InvalidInput, NotFound, PayloadTooLarge, StorageQuotaExceeded
from queueformer.contract.ids import new_id, valid_object_id
from queueformer.server import keys
from queueformer.server.storage import Storage, storage_errors

log = logging.getLogger(__name__)

Purpose = Literal["batch", "fine-tune", "batch_output", "fine-tune-results"]
UPLOAD_PURPOSES = ("batch", "fine-tune")

# Reserve a file's bytes against its tenant's quota and record it, in one step. KEYS: stored bytes,
# file, tenant files, expiry index. ARGV: size, quota (-1: none), tenant, File JSON, created, id,
# expires_at ('' for never). Returns {recorded, bytes stored before}.
_RECORD = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local size = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
if cap >= 0 and cur + size > cap then return {0, cur} end
redis.call('INCRBY', KEYS[1], size)
redis.call('HSET', KEYS[2], 'tenant', ARGV[3], 'object', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[6])
if ARGV[7] ~= '' then redis.call('ZADD', KEYS[4], ARGV[7], ARGV[6]) end
return {1, cur}
"""

# Drop a file's record once and give its bytes back. KEYS: file, tenant files, expiry index, stored
# bytes. ARGV: id, size. Returns 1 when this call dropped it, 0 when it was already gone.
_DROP = """
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('DECRBY', KEYS[4], ARGV[2]) < 0 then redis.call('SET', KEYS[4], 0) end
return 1
"""


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

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (time.time() if now is None else now)


class FileStore:
    """Create, read, list, delete and expire files of a tenant."""

    def __init__(self, client: redis.Redis, storage: Storage) -> None:
        self.r = client
        self.storage = storage
        self._record_script = client.register_script(_RECORD)
        self._drop = client.register_script(_DROP)

    def stored_bytes(self, tenant: str) -> int:
        return int(cast(str | None, self.r.get(keys.tenant_stored_bytes(tenant))) or 0)

    def create(
        self,
        tenant: str,
        filename: str,
        purpose: str,
        src: IO[bytes],
        max_bytes: int,
        *,
        quota_bytes: int | None = None,
        expires_after_s: int | None = None,
    ) -> FileObject:
        """Stream ``src`` into storage, refusing more than ``max_bytes`` or what would pass ``quota_bytes``.

        The file exists only once complete and recorded; a refused upload leaves nothing behind.
        """
        file_id = new_id("file")
        key = self.storage.file_key(file_id)
        used = self.stored_bytes(tenant) if quota_bytes is not None else 0
        size = 0
        with self.storage.open_write(key) as out:
            while chunk := src.read(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"file is larger than the upload limit of {max_bytes} bytes", param="file")
                if quota_bytes is not None and used + size > quota_bytes:
                    raise self._over_quota(used, quota_bytes)
                out.write(chunk)
        try:
            return self._record(tenant, file_id, filename, purpose, size, expires_after_s, quota_bytes)
        except BaseException:
            self.storage.delete(key)
            raise

    def create_bytes(
        self, tenant: str, filename: str, purpose: str, data: bytes, expires_after_s: int | None = None
    ) -> FileObject:
        """A file the system produced (batch output): stored and counted, never refused by the quota."""
        file_id = new_id("file")
        self.storage.put_bytes(self.storage.file_key(file_id), data)
        return self._record(tenant, file_id, filename, purpose, len(data), expires_after_s)

    @staticmethod
    def _over_quota(used: int, quota: int) -> StorageQuotaExceeded:
        return StorageQuotaExceeded(
            f"storing this file would pass the tenant's storage quota of {quota} bytes ({used} bytes stored); "
            "delete files to make room",
            param="file",
            details={"stored_bytes": used, "limit": quota},
        )

    def _record(
        self,
        tenant: str,
        file_id: str,
        filename: str,
        purpose: str,
        size: int,
        expires_after_s: int | None = None,
        quota_bytes: int | None = None,
    ) -> FileObject:
        now = time.time()
        obj = FileObject(
            id=file_id,
            bytes=size,
            created_at=int(now),
            filename=filename[:255],
            purpose=purpose,
            expires_at=int(now) + expires_after_s if expires_after_s is not None else None,
        )
        ok, used = self._record_script(
            keys=[keys.tenant_stored_bytes(tenant), keys.file(file_id), keys.tenant_files(tenant), keys.FILE_EXPIRY],
            args=[
                size,
                -1 if quota_bytes is None else quota_bytes,
                tenant,
                obj.model_dump_json(),
                now,
                file_id,
                "" if obj.expires_at is None else obj.expires_at,
            ],
        )
        if not ok:
            raise self._over_quota(int(used), cast(int, quota_bytes))
        return obj

    def get(self, file_id: str, tenant: str | None) -> FileObject:
        """A live file of ``tenant``; another tenant's, an expired or a missing one all answer the same 404."""
        if not valid_object_id(file_id):
            raise NotFound(f"file {file_id!r} not found", param="file_id")
        data = cast(dict[str, str], self.r.hgetall(keys.file(file_id)))
        if not data or (tenant is not None and data.get("tenant") != tenant):
            raise NotFound(f"file {file_id!r} not found", param="file_id")
        obj = FileObject.model_validate_json(data["object"])
        if obj.expired():
            raise NotFound(f"file {file_id!r} not found", param="file_id")
        return obj

    def tenant_of(self, file_id: str) -> str | None:
        return cast(str | None, self.r.hget(keys.file(file_id), "tenant"))

    def page(
        self, tenant: str, purpose: str | None = None, limit: int = 100, after: str | None = None
    ) -> tuple[list[FileObject], bool]:
        ids = cast(list[str], self.r.zrevrange(keys.tenant_files(tenant), 0, -1))
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1 :]
        out: list[FileObject] = []
        now = time.time()
        p = self.r.pipeline(transaction=False)
        for file_id in ids:
            p.hget(keys.file(file_id), "object")
        for raw in p.execute():
            if raw is None:
                continue
            obj = FileObject.model_validate_json(raw)
            if obj.expired(now):
                continue
            if purpose is None or obj.purpose == purpose:
                out.append(obj)
            if len(out) > limit:
                break
        return out[:limit], len(out) > limit

    def delete(self, file_id: str, tenant: str) -> dict[str, Any]:
        obj = self.get(file_id, tenant)
        self._remove(file_id, tenant, obj.bytes)
        return {"id": file_id, "object": "file", "deleted": True}

    def _remove(self, file_id: str, tenant: str, size: int) -> bool:
        """Drop the record (bytes given back once), then the content; False when someone else dropped it."""
        names = [keys.file(file_id), keys.tenant_files(tenant), keys.FILE_EXPIRY, keys.tenant_stored_bytes(tenant)]
        if not self._drop(keys=names, args=[file_id, size]):
            return False
        self.storage.delete(self.storage.file_key(file_id))
        return True

    def sweep_expired(self, now: float | None = None, limit: int = 1000) -> list[str]:
        """Delete up to ``limit`` files whose expiry has passed, from Redis and storage; returns their ids."""
        now = time.time() if now is None else now
        due = cast(list[str], self.r.zrangebyscore(keys.FILE_EXPIRY, "-inf", now, start=0, num=limit))
        swept = []
        for file_id in due:
            data = cast(dict[str, str], self.r.hgetall(keys.file(file_id)))
            if not data:
                self.r.zrem(keys.FILE_EXPIRY, file_id)  # deleted by its owner meanwhile
                continue
            obj = FileObject.model_validate_json(data["object"])
            if not obj.expired(now):
                continue
            if self._remove(file_id, data["tenant"], obj.bytes):
                swept.append(file_id)
        if swept:
            log.info("deleted %d expired files", len(swept))
        return swept

    def key(self, file_id: str) -> str:
        return self.storage.file_key(file_id)


class TrainingData:
    """What a fine-tune may train on, checked when the job is accepted and again before a worker reads it.

    A reference is either a file id of the job's tenant with purpose ``fine-tune``, or a URI under one
    of the operator's ``prefixes`` (shared data every tenant may read). Anything else is refused with
    the same answer whether or not the object exists, so no tenant learns about another's objects.
    """

    def __init__(self, files: FileStore, prefixes: Sequence[str], options: dict[str, Any] | None = None) -> None:
        self.files = files
        self.prefixes = [p if p.endswith("/") else p + "/" for p in prefixes]
        self.options = options or {}

    def check(self, ref: str, tenant: str) -> None:
        """Refuse a reference the tenant may not train on: 404 for a file it does not own, else 422."""
        if ref.startswith("file-"):
            self._own_file(ref, tenant)
            return
        if not self._allowed_uri(ref):
            allowed = f" or a URI under {', '.join(self.prefixes)}" if self.prefixes else ""
            raise InvalidInput(
                f"training_file must be the id of one of your files with purpose 'fine-tune'{allowed}",
                param="training_file",
            )
        with self.open(ref, tenant):
            pass  # allowed data is shared by the operator: saying whether it exists leaks nothing

    @contextlib.contextmanager
    def open(self, ref: str, tenant: str) -> Iterator[IO[bytes]]:
        """The data, for ``tenant``'s job only: ownership (or the allowlist) is checked again here."""
        legacy = self.files.storage.url + "/files/"
        if ref.startswith(legacy) and valid_object_id(ref[len(legacy) :]):
            ref = ref[len(legacy) :]  # queued by an older version, which stored the resolved URI of a file id
        if ref.startswith("file-"):
            self._own_file(ref, tenant)
            try:
                with self.files.storage.open_read(self.files.key(ref)) as fh:
                    yield fh
            except NotFound:
                raise self._missing(ref) from None
            return
        if not self._allowed_uri(ref):
            raise InvalidInput("training_file is not a URI this cluster allows", param="training_file")
        storage = self.files.storage
        if ref.startswith(storage.url + "/"):
            try:
                with storage.open_read(storage.key_of(ref)) as fh:
                    yield fh
            except NotFound:
                raise self._missing(ref) from None
            return
        options = self.options if ref.split("://", 1)[0] == storage.url.split("://", 1)[0] else {}
        try:
            with storage_errors(ref), fsspec.open(ref, "rb", **options) as fh:
                yield fh
        except NotFound:
            raise self._missing(ref) from None

    def _own_file(self, file_id: str, tenant: str) -> None:
        if not tenant:  # a job without a tenant owns no file (FileStore.get would not filter)
            raise self._missing(file_id)
        try:
            obj = self.files.get(file_id, tenant)
        except NotFound:
            raise self._missing(file_id) from None
        if obj.purpose != "fine-tune":
            raise InvalidInput(
                f"file {file_id} has purpose {obj.purpose!r}; training data needs purpose 'fine-tune'",
                param="training_file",
            )

    def _allowed_uri(self, ref: str) -> bool:
        scheme, sep, rest = ref.partition("://")
        if not sep or not scheme or any(p in ("", ".", "..") for p in rest.split("/")[1:]):
            return False  # no ../ (or empty parts) that would walk out of an allowed prefix
        return any(ref.startswith(prefix) for prefix in self.prefixes)

    @staticmethod
    def _missing(ref: str) -> NotFound:
        return NotFound(f"training file {ref!r} not found", param="training_file")


def dumps_lines(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for line in lines)
