"""Python SDK for a queueformer cluster (HTTP only; needs neither torch nor Redis).

>>> from queueformer import Client
>>> qf = Client("http://127.0.0.1:8000", api_key="qf-...")
>>> job = qf.submit({"task": "generate", "model": "tiny-gpt2", "prompt": "The weather today"})
>>> qf.wait(job)["state"], qf.result(job)["generations"][0]["text"]
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from queueformer.contract.errors import ErrorInfo, QueueformerError, error_from_info

TERMINAL_JOB = ("succeeded", "failed", "cancelled")
TERMINAL_BATCH = ("completed", "failed", "expired", "cancelled")


class Client:
    """Submit jobs and batches, follow them and fetch results."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.http.request(method, path, **kwargs)
        if resp.status_code >= 400:
            raise _error(resp)
        if resp.headers.get("content-type", "").startswith("application/json"):
            return resp.json()
        return resp.content

    # --- single jobs ------------------------------------------------------------------------------

    def submit(self, job: dict[str, Any] | BaseModel, idempotency_key: str | None = None) -> str:
        body = job.model_dump(mode="json", exclude_none=True) if isinstance(job, BaseModel) else job
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return str(self._call("POST", "/v1/jobs", json=body, headers=headers)["id"])

    def submit_many(self, jobs: Iterable[dict[str, Any] | BaseModel], chunk: int = 1000) -> list[str]:
        """Submit many small jobs, ``chunk`` per request (the API groups them into few messages)."""
        bodies = [j.model_dump(mode="json", exclude_none=True) if isinstance(j, BaseModel) else j for j in jobs]
        ids: list[str] = []
        for start in range(0, len(bodies), chunk):
            data = self._call("POST", "/v1/jobs/bulk", json={"jobs": bodies[start : start + chunk]})["data"]
            ids.extend(d["id"] for d in data)
        return ids

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}")
        return result

    def result(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}/result")
        return result

    def jobs(self, limit: int = 20, before: float | None = None) -> list[dict[str, Any]]:
        """Your most recent jobs, newest first (``before``: the ``created_at`` of the last one of a page)."""
        params: dict[str, Any] = {"limit": limit}
        if before is not None:
            params["before"] = before
        data: list[dict[str, Any]] = self._call("GET", "/v1/jobs", params=params)["data"]
        return data

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 0.2) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.job(job_id)
            if record["state"] in TERMINAL_JOB:
                return record
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {record['state']} after {timeout}s")
            time.sleep(poll_s)

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event type, data) from the job's server-sent event stream, until it ends."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise _error(resp)
            kind, data = "message", ""
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()
                elif not line and data:
                    yield kind, json.loads(data)
                    kind, data = "message", ""

    # --- files and batches ----------------------------------------------------------------------------

    def upload(
        self,
        source: str | Path | bytes,
        purpose: str = "batch",
        filename: str | None = None,
        expires_after_s: int | None = None,
    ) -> dict[str, Any]:
        """Upload a file; ``expires_after_s`` (3600 to 2592000) has the server delete it that long after upload."""
        if isinstance(source, bytes):
            content, name = source, filename or "input.jsonl"
        else:
            content, name = Path(source).read_bytes(), filename or Path(source).name
        form = {"purpose": purpose}
        if expires_after_s is not None:
            form.update({"expires_after[anchor]": "created_at", "expires_after[seconds]": str(expires_after_s)})
        result: dict[str, Any] = self._call("POST", "/v1/files", files={"file": (name, content)}, data=form)
        return result

    def file_content(self, file_id: str) -> bytes:
        content: bytes = self._call("GET", f"/v1/files/{file_id}/content")
        return content

    def create_batch(
        self,
        input_file_id: str,
        endpoint: str = "/v1/jobs",
        metadata: dict[str, str] | None = None,
        webhook_url: str | None = None,
        output_expires_after_s: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"input_file_id": input_file_id, "endpoint": endpoint, "completion_window": "24h"}
        if metadata:
            body["metadata"] = metadata
        if output_expires_after_s is not None:
            body["output_expires_after"] = {"anchor": "created_at", "seconds": output_expires_after_s}
        if webhook_url:
            body["webhook_url"] = webhook_url
        result: dict[str, Any] = self._call("POST", "/v1/batches", json=body)
        return result

    def batch(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/batches/{batch_id}")
        return result

    def batches(self, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        """A page of your batches, newest first: ``{"data": [...], "has_more": ..., "last_id": ...}``."""
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        result: dict[str, Any] = self._call("GET", "/v1/batches", params=params)
        return result

    def partial_output(self, batch_id: str, errors: bool = False) -> bytes:
        """Output (or error) lines a batch has committed so far, while it runs."""
        params = {"errors": "true"} if errors else {}
        data = self._call("GET", f"/v1/batches/{batch_id}/output", params=params)
        return data if isinstance(data, bytes) else json.dumps(data).encode()

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/v1/batches/{batch_id}/cancel")
        return result

    def retry_batch(self, batch_id: str, codes: list[str] | None = None, all_failed: bool = False) -> dict[str, Any]:
        """Re-run failed lines: by default those that may succeed again; ``codes`` by error code; ``all_failed`` all."""
        body: dict[str, Any] = {"codes": codes}
        if all_failed:
            body["all"] = True
        result: dict[str, Any] = self._call("POST", f"/v1/batches/{batch_id}/retry", json=body)
        return result

    def wait_batch(
        self,
        batch_id: str,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 0.5,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self.batch(batch_id)
            if on_progress is not None:
                on_progress(batch)
            if batch["status"] in TERMINAL_BATCH:
                return batch
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} still {batch['status']} after {timeout}s")
            time.sleep(poll_s)

    def batch_results(self, batch: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(output lines, error lines) of a finished batch."""
        out = _jsonl(self.file_content(batch["output_file_id"])) if batch.get("output_file_id") else []
        err = _jsonl(self.file_content(batch["error_file_id"])) if batch.get("error_file_id") else []
        return out, err

    def models(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._call("GET", "/v1/models")["data"]
        return data


def _jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def _error(resp: httpx.Response) -> QueueformerError:
    try:
        err = resp.json()["error"]
        exc = error_from_info(ErrorInfo(code=err["code"], message=err["message"], param=err.get("param")))
    except (ValueError, KeyError, TypeError):
        exc = QueueformerError(f"HTTP {resp.status_code}: {resp.text[:500]}")
    exc.details["status_code"] = resp.status_code
    return exc
