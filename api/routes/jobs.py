"""Single jobs: submit (one or many), status, result, cancel and a live event stream."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, cast

from fastapi import APIRouter, Body, Header, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from api.deps import ServicesDep, TenantDep
from api.enqueue import Enqueuer
from api.errors import AUTHED, BODY, responses
from api.links import link, links
from api.services import Services
from queueformer.contract.errors import Conflict, NotFound
from queueformer.contract.ids import valid_object_id
from queueformer.contract.jobs import GenerateJob, check_fits
from queueformer.contract.records import TERMINAL, CancelAnswer, JobRecord, JobState
from queueformer.contract.tasks import AnyJob, JobSpec
from queueformer.server import keys
from queueformer.server.jobs import public_event

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

IDEMPOTENCY_TTL_S = 24 * 3600


class JobAccepted(BaseModel):
    id: str
    object: str = "job"
    state: JobState = JobState.QUEUED
    status_url: str
    result_url: str
    events_url: str


class BulkJobs(BaseModel):
    jobs: list[JobSpec] = Field(min_length=1, max_length=10_000)


class JobList(BaseModel):
    object: str = "list"
    data: list[Any]
    has_more: bool = False


def _accepted(job_id: str) -> JobAccepted:
    base = f"/v1/jobs/{job_id}"
    return JobAccepted(id=job_id, status_url=base, result_url=f"{base}/result", events_url=f"{base}/events")


def _idempotent(services: Services, tenant: str, key: str, body: bytes) -> tuple[str, list[str] | None]:
    """Claim ``key`` for this body; returns (redis key, job ids already created for it, if any)."""
    rkey = keys.idempotency(tenant, hashlib.sha256(key.encode()).hexdigest())
    digest = hashlib.sha256(body).hexdigest()
    if services.redis.set(rkey, json.dumps({"body": digest, "ids": None}), nx=True, ex=IDEMPOTENCY_TTL_S):
        return rkey, None
    stored = json.loads(cast(str, services.redis.get(rkey)) or "{}")
    if stored.get("body") != digest:
        raise Conflict("Idempotency-Key was already used with a different body", param="Idempotency-Key")
    if stored.get("ids") is None:
        raise Conflict(
            "a request with this Idempotency-Key is still being accepted; retry shortly", param="Idempotency-Key"
        )
    return rkey, list(stored["ids"])


def _check_fits(services: Services, tenant: str, specs: list[AnyJob], bulk: bool) -> None:
    """Refuse generate jobs that cannot fit their model's context window (a 422 now, not a failure later)."""
    if not any(isinstance(s, GenerateJob) for s in specs):
        return
    registry = services.registry()
    for i, spec in enumerate(specs):
        if isinstance(spec, GenerateJob):
            entry = registry.get(spec.model, spec.task, tenant=tenant)
            check_fits(spec, entry.max_input_tokens, f"jobs.{i}.max_new_tokens" if bulk else "max_new_tokens")


def _submit(
    services: Services,
    tenant: str,
    specs: list[AnyJob],
    key: str | None,
    body: Callable[[], bytes],
    bulk: bool = False,
) -> list[str]:
    """Enqueue ``specs``; with an Idempotency-Key, ``body()`` (the canonical request) is hashed to match retries."""
    _check_fits(services, tenant, specs, bulk)
    if not key:
        return Enqueuer(services).submit(specs, tenant)
    canonical = body()
    rkey, existing = _idempotent(services, tenant, key, canonical)
    if existing is not None:
        return existing
    try:
        ids = Enqueuer(services).submit(specs, tenant)
    except Exception:
        services.redis.delete(rkey)
        raise
    digest = hashlib.sha256(canonical).hexdigest()
    services.redis.set(rkey, json.dumps({"body": digest, "ids": ids}), ex=IDEMPOTENCY_TTL_S)
    return ids


@router.post(
    "",
    responses=responses(*AUTHED, *BODY, 404, 409, 429),
    openapi_extra=links(
        202,
        GetJob=link("/v1/jobs/{job_id}", "get", "job_id"),
        GetJobResult=link("/v1/jobs/{job_id}/result", "get", "job_id"),
        CancelJob=link("/v1/jobs/{job_id}/cancel", "post", "job_id"),
    ),
    status_code=202,
    response_model=JobAccepted,
    summary="Submit one job of any type",
)
def submit_job(
    services: ServicesDep,
    tenant: TenantDep,
    job: Annotated[JobSpec, Body()],
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobAccepted:
    def body() -> bytes:
        return json.dumps(job.model_dump(mode="json"), sort_keys=True).encode()

    return _accepted(_submit(services, tenant, [job], idempotency_key, body)[0])


@router.post(
    "/bulk",
    responses=responses(*AUTHED, *BODY, 404, 409, 429),
    status_code=202,
    response_model=JobList,
    summary="Submit many small jobs in one request",
)
def submit_jobs(
    services: ServicesDep,
    tenant: TenantDep,
    bulk: BulkJobs,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobList:
    def body() -> bytes:
        return json.dumps([j.model_dump(mode="json") for j in bulk.jobs], sort_keys=True).encode()

    ids = _submit(services, tenant, list(bulk.jobs), idempotency_key, body, bulk=True)
    return JobList(data=[_accepted(i) for i in ids])


def _check_id(job_id: str) -> None:
    if not valid_object_id(job_id):
        raise NotFound(f"job {job_id!r} not found", param="job_id")


@router.get(
    "", responses=responses(*AUTHED, 422), response_model=JobList, summary="List this tenant's jobs, newest first"
)
def list_jobs(
    services: ServicesDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    before: Annotated[
        float | None,
        Query(ge=0, allow_inf_nan=False, description="created_at of the last job of the previous page"),
    ] = None,
) -> JobList:
    records = services.jobs.recent(tenant, limit + 1, before)
    return JobList(data=records[:limit], has_more=len(records) > limit)


@router.get(
    "/{job_id}",
    responses=responses(*AUTHED, 404, 422),
    response_model=JobRecord,
    summary="A job's state, timestamps, progress and error",
)
def get_job(job_id: str, services: ServicesDep, tenant: TenantDep) -> JobRecord:
    _check_id(job_id)
    record = services.jobs.get(job_id, tenant)
    record.status_url = f"/v1/jobs/{job_id}"
    return record


@router.get(
    "/{job_id}/result",
    responses=responses(*AUTHED, 404, 409, 422),
    summary="The result of a succeeded job (409 while it is not)",
)
def get_result(job_id: str, services: ServicesDep, tenant: TenantDep) -> Any:
    _check_id(job_id)
    record = services.jobs.get(job_id, tenant)
    if record.state != JobState.SUCCEEDED or record.result_url is None:
        detail = {"state": record.state.value, "job_error": record.error.model_dump() if record.error else None}
        raise Conflict(f"job {job_id} is {record.state.value}; it has no result", details=detail)
    return services.storage.get_json(services.storage.result_key(job_id))


@router.post(
    "/{job_id}/cancel",
    responses=responses(*AUTHED, 404, 422),
    response_model=CancelAnswer,
    summary="Cancel a queued or running job",
)
def cancel_job(job_id: str, services: ServicesDep, tenant: TenantDep) -> CancelAnswer:
    _check_id(job_id)
    services.jobs.get(job_id, tenant)
    services.jobs.request_cancel(job_id)
    record = services.jobs.get(job_id, tenant)
    status = record.state.value if record.state.terminal else "cancelling"
    return CancelAnswer(**record.model_dump(exclude={"status_url"}), status_url=f"/v1/jobs/{job_id}", status=status)


@router.get(
    "/{job_id}/events",
    responses=responses(*AUTHED, 404, 422),
    summary="Server-sent events: state changes, progress, and tokens of generate jobs submitted with stream=true",
    response_class=StreamingResponse,
)
async def job_events(
    job_id: str,
    services: ServicesDep,
    tenant: TenantDep,
    # a stream id (19 digits at most per part: Redis refuses larger ones)
    last_event_id: Annotated[str, Header(pattern=r"^\d{1,19}(-\d{1,19})?$")] = "0-0",
) -> StreamingResponse:
    _check_id(job_id)
    services.jobs.get(job_id, tenant)
    return StreamingResponse(_event_stream(services, job_id, last_event_id), media_type="text/event-stream")


async def _event_stream(services: Services, job_id: str, after: str) -> AsyncIterator[bytes]:
    import redis.asyncio as aioredis

    client: Any = aioredis.Redis.from_url(services.settings.redis(), decode_responses=True)
    try:
        while True:
            res = await client.xread({keys.events(job_id): after}, count=500, block=15_000)
            if not res:
                yield b": keep-alive\n\n"
                state = await client.hget(keys.job(job_id), "state")
                if state is None or state in TERMINAL:
                    return
                continue
            for _key, entries in res:
                for eid, fields in entries:
                    after = eid
                    kind = fields.get("type", "message")
                    body = fields.get("data", "{}")
                    if kind in ("state", "checkpoint"):  # token events (the bulk) pass through unparsed
                        data = json.loads(body)
                        body = json.dumps(public_event(job_id, data))
                    yield f"id: {eid}\nevent: {kind}\ndata: {body}\n\n".encode()
                    if kind == "state" and data.get("state") in TERMINAL:
                        return
    finally:
        await client.aclose()
