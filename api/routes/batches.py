"""``/v1/batches``: the OpenAI Batch API, for every job type, plus partial output and retries.

Every line is validated when the batch is created: bad lines and duplicate ``custom_id``s go to the
error file with their line numbers and never stop the rest. Valid lines are enqueued as byte-range
chunks of the input file, sized from the model's measured throughput.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field

from api.deps import ServicesDep, TenantDep
from api.services import Services
from queueformer.contract.errors import BrokerUnavailable, InvalidInput, NotFound, PayloadTooLarge, QuotaExceeded
from queueformer.contract.ids import new_id
from queueformer.contract.jobs import check_fits
from queueformer.contract.openai_batch import ENDPOINTS, BatchCreate
from queueformer.contract.tasks import AnyJob
from queueformer.contract.units import LinesUnit
from queueformer.server import keys
from queueformer.server.batches import TooManyLines, scan_file, to_openai
from queueformer.server.broker import publish

router = APIRouter(prefix="/v1/batches", tags=["batches"])

MIN_CHUNK, MAX_CHUNK = 8, 4096


def lines_per_chunk(workers: list[dict[str, Any]], max_batch_size: int, target_s: float) -> int:
    """Lines per message for a model served by ``workers`` (their fleet announcements).

    About ``target_s`` of work at the measured rate, but never so few that a worker's consumer slots
    together hold less than one full engine batch: with 16 slots and 256-row batches, 2 s of work at
    7 lines/s would be 14-line chunks, and the engine would never run more than 224 rows. Before any
    rate is known, one engine batch per message.
    """
    rates = [float(w["lines_per_s"]) for w in workers if w.get("lines_per_s")]
    slots = [int(w["slots"]) for w in workers if w.get("slots")]
    fill = -(-max_batch_size // min(slots)) if slots else 1
    size = max(int(sum(rates) / len(rates) * target_s), fill) if rates else max_batch_size
    return max(MIN_CHUNK, min(MAX_CHUNK, size))


def chunk_size(services: Services, model: str, max_batch_size: int) -> int:
    workers = services.fleet.by_model().get(model, [])
    return lines_per_chunk(workers, max_batch_size, services.settings.worker.chunk_target_s)


@router.post("", summary="Create a batch from an uploaded JSONL file")
def create_batch(body: BatchCreate, services: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    if body.endpoint not in ENDPOINTS:
        raise InvalidInput(
            f"endpoint {body.endpoint!r} is not supported; supported: {', '.join(ENDPOINTS)}", param="endpoint"
        )
    file = services.files.get(body.input_file_id, tenant)
    if file.purpose != "batch":
        raise InvalidInput(
            f"file {file.id} has purpose {file.purpose!r}; batches need purpose 'batch'", param="input_file_id"
        )
    quota = services.settings.quota
    if services.batches.open_batches(tenant) >= quota.max_open_batches:
        raise QuotaExceeded(f"tenant has {quota.max_open_batches} open batches; wait for one to finish")
    registry = services.registry()

    def registered(job: AnyJob) -> None:
        entry = registry.get(job.model, job.task, tenant=tenant)
        registry.queue_for(entry, job.task)
        check_fits(job, entry.max_input_tokens, "body.max_new_tokens")

    try:
        scan = scan_file(
            services.storage, services.files.key(file.id), body.endpoint, quota.max_lines_per_batch, registered
        )
    except TooManyLines as exc:
        raise PayloadTooLarge(f"{exc}; the limit is {exc.limit} lines per batch", param="input_file_id") from None
    entries = [registry.get(m, tenant=tenant) for m in scan.models]
    if scan.tokens:
        enqueued = int(services.redis.get(keys.tenant_tokens(tenant)) or 0)
        if enqueued + scan.tokens > quota.max_enqueued_tokens:
            raise QuotaExceeded(
                f"the batch holds about {scan.tokens} tokens and {enqueued} are enqueued; "
                f"the limit is {quota.max_enqueued_tokens}",
                details={"enqueued_tokens": enqueued, "limit": quota.max_enqueued_tokens},
            )
    batch_id = new_id("batch")
    size = min((chunk_size(services, e.name, e.max_batch_size) for e in entries), default=MIN_CHUNK)
    chunks = scan.chunks(size)
    services.batches.create(batch_id, tenant, body.model_dump())
    services.batches.start(batch_id, scan, chunks, tenant)
    if services.batches.raw(batch_id)["status"] == "in_progress":
        try:
            _publish(services, services.batches.units(batch_id), tenant)
        except Exception as exc:
            services.batches.set_status(batch_id, ["in_progress"], "cancelling", "cancelling_at")
            services.batches.close_out(batch_id, "broker_unavailable", "the batch could not be enqueued")
            services.batches.maybe_finalize(batch_id)
            raise BrokerUnavailable(f"could not enqueue batch {batch_id}: {exc}") from exc
    return to_openai(services.batches.raw(batch_id))


def _publish(services: Services, units: list[LinesUnit], tenant: str) -> None:
    registry = services.registry()
    with services.celery.producer_or_acquire() as producer:
        for unit in units:
            entry = registry.get(unit.model, tenant=tenant)
            publish(services.celery, unit, registry.queue_for(entry, entry.task), producer=producer)


def _current(services: Services, batch_id: str, tenant: str) -> dict[str, Any]:
    raw = services.batches.get_raw(batch_id, tenant)
    # Lazy upkeep: expire a batch past its window; finish one whose finalizer died.
    if raw["status"] == "in_progress" and time.time() > int(raw.get("expires_at", "0")):
        services.batches.maybe_expire(batch_id, raw)
    elif raw["status"] in ("in_progress", "finalizing") and services.batches.remaining(raw) == 0:
        services.batches.maybe_finalize(batch_id)
    return to_openai(services.batches.raw(batch_id))


@router.get("/{batch_id}", summary="A batch, with status, request counts and file ids")
def get_batch(batch_id: str, services: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    return _current(services, batch_id, tenant)


@router.get("", summary="List batches, newest first")
def list_batches(
    services: ServicesDep, tenant: TenantDep, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict[str, Any]:
    rows, more = services.batches.page(tenant, after, limit)
    data = [to_openai(r) for r in rows]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


@router.post("/{batch_id}/cancel", summary="Cancel a batch; finished lines stay in its output file")
def cancel_batch(batch_id: str, services: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    services.batches.get_raw(batch_id, tenant)
    services.batches.cancel(batch_id)
    return to_openai(services.batches.raw(batch_id))


@router.get(
    "/{batch_id}/output",
    summary="Extension: the output (or, with errors=true, error) lines committed so far, while the batch runs",
    response_class=Response,
)
def partial_output(batch_id: str, services: ServicesDep, tenant: TenantDep, errors: bool = False) -> Response:
    services.batches.get_raw(batch_id, tenant)
    return Response(services.batches.partial_output(batch_id, errors=errors), media_type="application/jsonl")


class RetryRequest(BaseModel):
    codes: list[str] | None = Field(
        None,
        description="Error codes to retry (e.g. batch_expired, worker_lost, out_of_memory); "
        "default: every failure that was not a 400.",
    )


@router.post("/{batch_id}/retry", summary="Extension: re-run only the failed or expired lines of a finished batch")
def retry_batch(
    batch_id: str, services: ServicesDep, tenant: TenantDep, body: RetryRequest | None = None
) -> dict[str, Any]:
    services.batches.get_raw(batch_id, tenant)
    lines = services.batches.retry(batch_id, set(body.codes) if body and body.codes else None)
    if not lines:
        raise NotFound("no failed lines match; nothing to retry", param="codes")
    _publish(services, services.batches.units(batch_id, only=set(lines)), tenant)
    return to_openai(services.batches.raw(batch_id))
