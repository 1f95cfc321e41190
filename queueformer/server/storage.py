"""Results, uploaded files, batch outputs, checkpoints and fine-tuned models, over fsspec.

One class owns the key layout so no other module builds a storage path. Writes are atomic: on a local
disk a file is written beside its destination and renamed over it; on object stores a single PUT (or a
multipart upload completed at close) is atomic by itself. A directory (checkpoint, model) is complete
only once its ``_COMPLETE`` manifest exists, and the manifest is written last.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from queueformer.contract.errors import InvalidInput, NotFound, StorageUnavailable
from queueformer.contract.ids import valid_object_id

MANIFEST = "_COMPLETE"


class Storage:
    """A storage root (``file:///data`` or ``s3://bucket/prefix``) with queueformer's key layout."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **(options or {}))
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    # --- key layout ---------------------------------------------------------------------------

    @staticmethod
    def _id(value: str) -> str:
        if not valid_object_id(value):
            raise InvalidInput(f"invalid object id {value!r}", param="id")
        return value

    @classmethod
    def file_key(cls, file_id: str) -> str:
        return f"files/{cls._id(file_id)}"

    @classmethod
    def result_key(cls, job_id: str) -> str:
        return f"results/{cls._id(job_id)}.json"

    @classmethod
    def checkpoint_key(cls, job_id: str, step: int) -> str:
        return f"checkpoints/{cls._id(job_id)}/step-{int(step):09d}"

    @classmethod
    def checkpoints_prefix(cls, job_id: str) -> str:
        return f"checkpoints/{cls._id(job_id)}"

    @classmethod
    def model_key(cls, model_id: str) -> str:
        return f"models/{cls._id(model_id)}"

    def uri(self, key: str) -> str:
        return f"{self.url}/{key}"

    def key_of(self, uri: str) -> str:
        """The key of a URI inside this storage root; refuses anything outside it."""
        prefix = self.url + "/"
        if not uri.startswith(prefix):
            raise InvalidInput(f"{uri!r} is not inside storage {self.url!r}", param="uri")
        return self._safe(uri[len(prefix) :])

    def _path(self, key: str) -> str:
        return f"{self.root}/{self._safe(key)}"

    @staticmethod
    def _safe(key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise InvalidInput(f"invalid storage key {key!r}", param="key")
        return key

    # --- objects -----------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> str:
        with self.open_write(key) as fh:
            fh.write(data)
        return self.uri(key)

    def put_json(self, key: str, obj: Any) -> str:
        return self.put_bytes(key, _json_bytes(obj))

    def put_json_many(self, objects: dict[str, Any]) -> dict[str, str]:
        """Write many small objects at once; the waits (fsync, or a PUT's round trip) overlap."""
        if len(objects) < 2:
            return {key: self.put_json(key, obj) for key, obj in objects.items()}
        futures = {key: _writers().submit(self.put_bytes, key, _json_bytes(obj)) for key, obj in objects.items()}
        return {key: fut.result() for key, fut in futures.items()}

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[IO[bytes]]:
        """A binary file whose content appears at ``key`` only when the block exits without error."""
        path = self._path(key)
        with storage_errors(key):
            if self.local:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex}"
                try:
                    with open(tmp, "wb") as fh:
                        yield fh
                        fh.flush()
                        os.fsync(fh.fileno())
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                # An object store makes the object visible when the upload completes at close(); a
                # failed block must abort the upload instead (closing would publish the partial data).
                fh = self.fs.open(path, "wb")
                try:
                    yield fh
                except BaseException:
                    fh.discard()
                    fh.closed = True
                    raise
                fh.close()

    def get_bytes(self, key: str) -> bytes:
        with storage_errors(key):
            data: bytes = self.fs.cat_file(self._path(key))
            return data

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of an object (ranged GET on object stores)."""
        with storage_errors(key):
            data: bytes = self.fs.cat_file(self._path(key), start=start, end=end)
            return data

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        with storage_errors(key), self.fs.open(self._path(key), "rb") as fh:
            yield fh

    def exists(self, key: str) -> bool:
        with storage_errors(key):
            return bool(self.fs.exists(self._path(key)))

    def size(self, key: str) -> int:
        with storage_errors(key):
            return int(self.fs.size(self._path(key)))

    def delete(self, key: str, recursive: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError), storage_errors(key):
            self.fs.rm(self._path(key), recursive=recursive)

    def list(self, prefix: str) -> list[str]:
        """Keys directly under ``prefix``."""
        with storage_errors(prefix):
            try:
                names = self.fs.ls(self._path(prefix), detail=False)
            except FileNotFoundError:
                return []
        base = self.root + "/"
        return sorted(n[len(base) :] if n.startswith(base) else n for n in names)

    # --- directories (checkpoints, models) ----------------------------------------------------

    def put_dir(self, local_dir: Path, key: str, manifest: dict[str, Any] | None = None) -> str:
        """Upload a local directory; it counts as present only once its manifest lands, last."""
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        for p in files:
            rel = p.relative_to(local_dir).as_posix()
            with self.open_write(f"{key}/{rel}") as fh, open(p, "rb") as src:
                while chunk := src.read(8 << 20):
                    fh.write(chunk)
        body = {"files": [p.relative_to(local_dir).as_posix() for p in files], **(manifest or {})}
        self.put_json(f"{key}/{MANIFEST}", body)
        return self.uri(key)

    def dir_complete(self, key: str) -> bool:
        return self.exists(f"{key}/{MANIFEST}")

    def manifest(self, key: str) -> dict[str, Any]:
        data: dict[str, Any] = self.get_json(f"{key}/{MANIFEST}")
        return data

    def get_dir(self, key: str, local_dir: Path) -> Path:
        """Download a complete directory into ``local_dir`` (which it creates)."""
        if not self.dir_complete(key):
            raise NotFound(f"{key} is not a complete directory in storage")
        local_dir.mkdir(parents=True, exist_ok=True)
        for rel in self.manifest(key)["files"]:
            dest = local_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with self.open_read(f"{key}/{rel}") as src, open(dest, "wb") as out:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
        return local_dir


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


_pool: ThreadPoolExecutor | None = None


def _writers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="storage-writer")
    return _pool


@contextlib.contextmanager
def storage_errors(key: str) -> Iterator[None]:
    """Missing objects become ``NotFound``; connection trouble becomes retryable ``StorageUnavailable``."""
    try:
        yield
    except FileNotFoundError as exc:
        raise NotFound(f"{key} not found in storage") from exc
    except (ConnectionError, TimeoutError) as exc:
        raise StorageUnavailable(f"storage did not answer for {key}: {exc}") from exc
    except OSError as exc:
        if exc.errno is None:  # s3fs/aiohttp wrap network failures as bare OSErrors
            raise StorageUnavailable(f"storage error for {key}: {exc}") from exc
        raise
