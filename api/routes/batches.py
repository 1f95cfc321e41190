"""``/v1/batches``: the OpenAI Batch API, for every job type, plus partial output and retries.

Every line is validated when the batch is created: bad lines and duplicate ``custom_id``s go to the
error file with their line numbers and never stop the rest. Valid lines are enqueued as byte-range
chunks of the input file, sized from the model's measured throughput.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field

from api.deps import ServicesDep, TenantDep
from api.errors import AUTHED, BODY, responses
from api.links import link, links
from api.services import Services
from queueformer.contract.errors import InvalidInput
from queueformer.contract.jobs import check_fits
from queueformer.contract.openai_batch import BatchCreate
from queueformer.contract.tasks import AnyJob
from queueformer.contract.units import LinesUnit
from queueformer.server.batches import to_openai
from queueformer.server.broker import publish

router = APIRouter(prefix="/v1/batches", tags=["batches"])

MIN_CHUNK, MAX_CHUNK = 8, 4096
FILL_BATCHES = 2  # engine batches a worker's slots hold together, at the least


def lines_per_chunk(workers: list[dict[str, Any]], max_batch_size: int, target_s: float) -> int:
    """Lines per message for a model served by ``workers`` (their fleet announcements).

    About ``target_s`` of work at the measured rate, but never so few that a worker's consumer slots
    together hold less than two full engine batches. A slot is held until the slowest line of its
    chunk finishes, so the lines in flight thin out as each chunk nears its end: with 16 slots and
    256-row batches, 16-line chunks (one batch's worth) let a long-tail file's running batch sag to
    90 rows between waves; two batches' worth keeps a second wave waiting in the engine. Before any
    rate is known, one engine batch per message.
    """
    rates = [float(w["lines_per_s"]) for w in workers if w.get("lines_per_s")]
    # A worker keeps one slot from batch chunks for jobs; workers that do not say so use them all.
    slots = [int(w.get("line_slots") or w["slots"]) for w in workers if w.get("slots")]
    fill = -(-FILL_BATCHES * max_batch_size // min(slots)) if slots else 1
    size = max(int(sum(rates) / len(rates) * target_s), fill) if rates else max_batch_size
    return max(MIN_CHUNK, min(MAX_CHUNK, size))


def chunk_size(services: Services, model: str, max_batch_size: int) -> int:
    workers = services.fleet.by_model().get(model, [])
    return lines_per_chunk(workers, max_batch_size, services.settings.worker.chunk_target_s)


@router.post(
    "",
    responses=responses(*AUTHED, *BODY, 403, 404, 429),
    openapi_extra=links(
        200,
        GetBatch=link("/v1/batches/{batch_id}", "get", "batch_id"),
        GetBatchOutput=link("/v1/batches/{batch_id}/output", "get", "batch_id"),
        CancelBatch=link("/v1/batches/{batch_id}/cancel", "post", "batch_id"),
        RetryBatch=link("/v1/batches/{batch_id}/retry", "post", "batch_id"),
    ),
    summary="Create a batch from an uploaded JSONL file",
)
def create_batch(body: BatchCreate, services: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    if body.webhook_url:
        # A literal private address or loopback name is refused now; names are checked when sent.
        services.webhooks.policy.check_literal(body.webhook_url)
    registry = services.registry()
    priority = services.tenants.get(tenant).batch_priority if body.priority is None else body.priority

    def registered(job: AnyJob) -> None:
        if job.priority is not None and job.priority != priority:
            # One message carries many lines, so a line cannot run at a priority of its own.
            raise InvalidInput(
                f"lines run at their batch's priority ({priority}); set it on the batch, not on a line",
                param="body.priority",
            )
        entry = registry.get(job.model, job.task, tenant=tenant)
        registry.queue_for(entry, job.task)
        check_fits(job, entry.max_input_tokens, "body.max_new_tokens")

    def size(models: list[str]) -> int:
        entries = [registry.get(m, tenant=tenant) for m in models]
        return min((chunk_size(services, e.name, e.max_batch_size) for e in entries), default=MIN_CHUNK)

    raw = services.batches.create(
        body,
        tenant,
        services.settings.quota,
        registered,
        size,
        lambda units: _publish(services, units, tenant),
        priority=priority,
    )
    return to_openai(raw)


def _publish(services: Services, units: list[LinesUnit], tenant: str) -> None:
    registry = services.registry()
    with services.celery.producer_or_acquire() as producer:
        for unit in units:
            entry = registry.get(unit.model, tenant=tenant)
            publish(services.celery, unit, registry.queue_for(entry, entry.task), producer=producer)


def _current(services: Services, batch_id: str, tenant: str) -> dict[str, Any]:
    raw = services.batches.get_raw(batch_id, tenant)
    if services.batches.refresh(batch_id, raw):
        raw = services.batches.raw(batch_id)
    return to_openai(raw)


@router.get(
    "/{batch_id}", responses=responses(*AUTHED, 404, 422), summary="A batch, with status, request counts and file ids"
)
def get_batch(batch_id: str, services: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    return _current(services, batch_id, tenant)


@router.get("", responses=responses(*AUTHED, 404, 422), summary="List batches, newest first (404: an unknown after id)")
def list_batches(
    services: ServicesDep,
    tenant: TenantDep,
    after: Annotated[
        str | None, Query(description="The last_id of the previous page; an id not in your listing is a 404.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
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


@router.post(
    "/{batch_id}/cancel",
    responses=responses(*AUTHED, 404, 409, 422),
    summary="Cancel a batch; finished lines stay in its output file",
)
def cancel_batch(batch_id: str, services: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    services.batches.get_raw(batch_id, tenant)
    services.batches.cancel(batch_id)
    return to_openai(services.batches.raw(batch_id))


@router.get(
    "/{batch_id}/output",
    responses=responses(*AUTHED, 404, 422),
    summary="Extension: the output (or, with errors=true, error) lines committed so far, while the batch runs",
    response_class=Response,
)
def partial_output(batch_id: str, services: ServicesDep, tenant: TenantDep, errors: bool = False) -> Response:
    services.batches.get_raw(batch_id, tenant)
    return Response(services.batches.partial_output(batch_id, errors=errors), media_type="application/jsonl")


class RetryRequest(BaseModel):
    codes: list[str] | None = Field(
        None,
        description="Error codes to retry (e.g. batch_expired, worker_lost, out_of_memory, invalid_input); "
        "default: every failure that may go differently on a new run, i.e. not request errors (a 4xx that "
        "is not retryable, such as an invalid body or an unknown model).",
    )
    all: bool = Field(False, description="Re-run every failed line, request errors included.")


@router.post(
    "/{batch_id}/retry",
    responses=responses(*AUTHED, *BODY, 404, 409),
    summary="Extension: re-run failed or expired lines of a finished batch (409 when there is nothing to re-run)",
)
def retry_batch(
    batch_id: str, services: ServicesDep, tenant: TenantDep, body: RetryRequest | None = None
) -> dict[str, Any]:
    services.batches.get_raw(batch_id, tenant)
    codes = set(body.codes) if body and body.codes else None
    every = bool(body and body.all)
    services.batches.retry(batch_id, codes, lambda units: _publish(services, units, tenant), every=every)
    return to_openai(services.batches.raw(batch_id))
