"""``POST /v1/embeddings``: OpenAI's embeddings route, answered synchronously over the job queue.

The request becomes an ``embed`` job, queued like any other (quotas, tenant, registry); the route then
waits on the job's event stream, without holding a thread, until it ends or ``api.sync_timeout_s``
passes (then the job is cancelled and the answer is a 504 naming it). Batches reach the same job type
through the ``/v1/embeddings`` batch url.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis.asyncio as aioredis
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from api.deps import ServicesDep, TenantDep
from api.enqueue import Enqueuer
from api.errors import AUTHED, BODY, responses
from api.services import Services
from queueformer.contract.errors import DeadlineExceeded, InternalError, error_from_info
from queueformer.contract.openai_batch import EmbeddingsBody, embeddings_list
from queueformer.contract.records import EmbedResult, JobState
from queueformer.server import keys
from queueformer.server.jobs import record_from_raw

router = APIRouter(prefix="/v1/embeddings", tags=["embeddings"])


@router.post(
    "",
    responses=responses(*AUTHED, *BODY, 404, 409, 429, 504, 507),
    summary="Embeddings for one input or a list, as OpenAI answers them",
)
async def create_embeddings(body: EmbeddingsBody, services: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    job = body.job()
    job_id = (await run_in_threadpool(Enqueuer(services).submit, [job], tenant))[0]
    if not await _ended(services, job_id, services.settings.api.sync_timeout_s):
        await run_in_threadpool(services.jobs.request_cancel, job_id)
        raise DeadlineExceeded(
            f"job {job_id} did not finish within {services.settings.api.sync_timeout_s:g}s; it was cancelled",
            details={"job_id": job_id},
        )
    record = record_from_raw(await run_in_threadpool(services.jobs.raw, job_id))
    if record.state != JobState.SUCCEEDED:
        if record.error is None:
            raise InternalError(f"job {job_id} ended {record.state.value} without an error")
        raise error_from_info(record.error)
    data = await run_in_threadpool(services.storage.get_json, services.storage.result_key(job_id))
    return embeddings_list(EmbedResult.model_validate(data), job.model)


async def _ended(services: Services, job_id: str, timeout_s: float) -> bool:
    """Wait for the job's terminal state event; False when ``timeout_s`` passes first."""
    client: Any = aioredis.Redis.from_url(services.settings.redis(), decode_responses=True)
    after = "0-0"
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                res = await client.xread({keys.events(job_id): after}, count=100, block=5_000)
                for _key, entries in res or []:
                    for eid, fields in entries:
                        after = eid
                        data = json.loads(fields.get("data") or "{}")
                        if fields.get("type") == "state" and JobState(data.get("state", "queued")).terminal:
                            return True
    except TimeoutError:
        return False
    finally:
        await client.aclose()
