"""Job records and event streams in Redis: the system of record for everything accepted.

The API writes a record when it accepts a job; workers move it through its states with compare-and-set
Lua scripts, so a redelivered message can never move a finished job backwards or finish it twice.
Every state change and progress update is also appended to the job's event stream, which the API
replays over SSE (late subscribers see the whole history).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import redis

from queueformer.contract.errors import ErrorInfo, NotFound
from queueformer.contract.jobs import Task
from queueformer.contract.priority import DEFAULT_JOB_PRIORITY
from queueformer.contract.records import JobRecord, JobState
from queueformer.contract.tasks import AnyJob, parse_job
from queueformer.server import keys

# Set fields and the new state only if the current state is one of the allowed ones (comma list), and
# append the state event to the job's stream (KEYS[2]) in the same step. ARGV: allowed, new state,
# record TTL ('0' while not terminal), event JSON, now, stream TTL, job id, the tenant-tokens key
# template (keys.TENANT_TOKENS_TEMPLATE), then field/value pairs. Reaching a terminal state starts the
# record's TTL, gives the job's estimated tokens back to its tenant and takes the job off the open
# index (KEYS[3]).
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, ''} end
if string.find(',' .. ARGV[1] .. ',', ',' .. cur .. ',', 1, true) == nil then return {0, cur} end
redis.call('HSET', KEYS[1], 'state', ARGV[2], unpack(ARGV, 9))
if ARGV[3] ~= '0' then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  local tenant = redis.call('HGET', KEYS[1], 'tenant')
  local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0')
  if tenant and tokens and tokens > 0 then
    redis.call('DECRBY', string.format(ARGV[8], tenant), tokens)
  end
  redis.call('ZREM', KEYS[3], ARGV[7])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 5000, '*', 'type', 'state', 'data', ARGV[4], 'at', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return {1, cur}
"""

# Start (or restart, when redelivered) a job unless it already finished: count the attempt, mark it
# running, record the event. Returns {started, attempts}.
_START = """
local cur = redis.call('HGET', KEYS[1], 'state')
if (not cur) or cur == 'succeeded' or cur == 'failed' or cur == 'cancelled' then return {0, 0} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[1])
local data = '{"state": "running", "attempt": ' .. attempts .. '}'
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 5000, '*', 'type', 'state', 'data', data, 'at', ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return {1, attempts}
"""


class JobStore:
    """Create, read and transition job records; append and read their events."""

    def __init__(self, client: redis.Redis, record_ttl_s: int = 7 * 24 * 3600) -> None:
        self.r = client
        self.ttl = record_ttl_s
        self._transition = client.register_script(_TRANSITION)
        self._start = client.register_script(_START)

    # --- creation ---------------------------------------------------------------------------

    def create_many(
        self,
        jobs: Sequence[tuple[str, AnyJob]],
        *,
        tenant: str,
        queue: Mapping[str, str],
        estimate_tokens: Mapping[str, int] | None = None,
        priority: Mapping[str, int] | None = None,
        pipe: redis.client.Pipeline | None = None,
    ) -> list[str]:
        """Write queued records for ``(job_id, spec)`` pairs in one round trip."""
        now = time.time()
        p = pipe or self.r.pipeline(transaction=False)
        for job_id, spec in jobs:
            own = DEFAULT_JOB_PRIORITY if spec.priority is None else spec.priority
            fields: dict[Any, Any] = {
                "id": job_id,
                "tenant": tenant,
                "task": spec.task,
                "model": spec.model,
                "queue": queue[job_id],
                "state": JobState.QUEUED.value,
                "created_at": repr(now),
                "spec": spec.model_dump_json(),
                "attempts": "0",
                "tokens": str((estimate_tokens or {}).get(job_id, 0)),
                "priority": str((priority or {}).get(job_id, own)),
            }
            if spec.timeout_s:
                fields["deadline"] = repr(now + spec.timeout_s)
            p.hset(keys.job(job_id), mapping=fields)
            p.zadd(keys.tenant_jobs(tenant), {job_id: now})
            p.zadd(keys.OPEN_JOBS, {job_id: now})
            if spec.task == Task.FINE_TUNE.value:
                p.zadd(keys.tenant_fine_tunes(tenant), {job_id: now})
            if fields["tokens"] != "0":
                p.incrby(keys.tenant_tokens(tenant), int(fields["tokens"]))
            self._event(p, job_id, "state", {"state": JobState.QUEUED.value})
        if pipe is None:
            p.execute()
        return [j for j, _ in jobs]

    # --- reads ------------------------------------------------------------------------------

    def raw(self, job_id: str) -> dict[str, str]:
        data = cast(dict[str, str], self.r.hgetall(keys.job(job_id)))
        if not data:
            raise NotFound(f"job {job_id!r} not found", param="job_id")
        return data

    def raw_many(self, job_ids: Sequence[str]) -> list[dict[str, str]]:
        p = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            p.hgetall(keys.job(job_id))
        return cast(list[dict[str, str]], p.execute())

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The record; another tenant's job is ``NotFound`` (never 403: ids must not leak)."""
        data = self.raw(job_id)
        if tenant is not None and data.get("tenant") != tenant:
            raise NotFound(f"job {job_id!r} not found", param="job_id")
        return record_from_raw(data)

    def spec(self, data: Mapping[str, str]) -> AnyJob:
        return parse_job(data["spec"])

    def recent(self, tenant: str, limit: int = 20, before: float | None = None, index: str = "jobs") -> list[JobRecord]:
        """Newest first; ``index`` ``fine-tunes`` lists only fine-tune jobs."""
        return [record_from_raw(d) for d in self.recent_raw(tenant, limit, before, index)]

    def recent_raw(
        self, tenant: str, limit: int = 20, before: float | None = None, index: str = "jobs"
    ) -> list[dict[str, str]]:
        top = f"({before}" if before is not None else "+inf"
        ids = cast(
            list[str], self.r.zrevrangebyscore(keys.tenant_index(index, tenant), top, "-inf", start=0, num=limit)
        )
        return [d for d in self.raw_many(ids) if d]

    # --- transitions --------------------------------------------------------------------------

    def transition(
        self,
        job_id: str,
        allowed: Iterable[JobState],
        to: JobState,
        fields: Mapping[str, str] | None = None,
        event: dict[str, Any] | None = None,
        pipe: redis.client.Pipeline | None = None,
    ) -> tuple[bool, str]:
        """Compare-and-set the state and record the event; returns (changed, state before).

        With ``pipe`` the call is queued and returns (True, "") at once: read the pipeline's results.
        """
        flat: list[str] = []
        for k, v in (fields or {}).items():
            flat += [k, v]
        ttl = str(self.ttl) if to.terminal else "0"
        data = json.dumps({"state": to.value, **(event or {})})
        allowed_csv = ",".join(s.value for s in allowed)
        args = [
            allowed_csv,
            to.value,
            ttl,
            data,
            repr(time.time()),
            str(self.ttl),
            job_id,
            keys.TENANT_TOKENS_TEMPLATE,
            *flat,
        ]
        names = [keys.job(job_id), keys.events(job_id), keys.OPEN_JOBS]
        result = self._transition(keys=names, args=args, client=pipe)
        if pipe is not None:
            return True, ""
        ok, before = result
        return bool(ok), str(before)

    def start_many(self, job_ids: Sequence[str]) -> list[int]:
        """Mark jobs running in one round trip; per job the attempt number, or 0 when it must be skipped."""
        p = self.r.pipeline(transaction=False)
        now = repr(time.time())
        for job_id in job_ids:
            self._start(keys=[keys.job(job_id), keys.events(job_id)], args=[now, str(self.ttl)], client=p)
        return [int(attempts) if started else 0 for started, attempts in p.execute()]

    def release(self, job_id: str) -> None:
        """Hand a running job back to the queue after a graceful stop: its attempt does not count."""
        ok, _ = self.transition(job_id, [JobState.RUNNING], JobState.QUEUED, event={"released": True})
        if ok:
            self.r.hincrby(keys.job(job_id), "attempts", -1)

    def start(self, job_id: str) -> tuple[bool, dict[str, str]]:
        """Mark one job running (also when redelivered while running); False when it must be skipped."""
        attempts = self.start_many([job_id])[0]
        return attempts > 0, self.raw(job_id) if attempts else {}

    def _finish_args(self, job_id: str, outcome: str | ErrorInfo) -> tuple[JobState, dict[str, str], dict[str, Any]]:
        now = repr(time.time())
        if isinstance(outcome, ErrorInfo):
            state = JobState.CANCELLED if outcome.code == "cancelled" else JobState.FAILED
            return state, {"finished_at": now, "error": outcome.model_dump_json()}, {"error": outcome.model_dump()}
        # The record keeps the storage URI (internal); the event clients read carries the API path.
        return JobState.SUCCEEDED, {"finished_at": now, "result_uri": outcome}, {"result_url": result_url(job_id)}

    def finish_many(self, outcomes: Sequence[tuple[str, str | ErrorInfo]]) -> list[bool]:
        """Record (job id, result URI or error) pairs in one round trip; False where a job had already ended."""
        if not outcomes:
            return []
        p = self.r.pipeline(transaction=False)
        for job_id, outcome in outcomes:
            state, fields, event = self._finish_args(job_id, outcome)
            self.transition(job_id, [JobState.RUNNING, JobState.QUEUED], state, fields, event, pipe=p)
        return [bool(ok) for ok, _ in p.execute()]

    def succeed(self, job_id: str, result_uri: str) -> bool:
        return self.finish_many([(job_id, result_uri)])[0]

    def fail(self, job_id: str, error: ErrorInfo) -> bool:
        return self.finish_many([(job_id, error)])[0]

    def request_cancel(self, job_id: str) -> JobState:
        """Cancel a queued job at once; flag a running one so its worker stops at the next check."""
        ok, before = self.transition(
            job_id,
            [JobState.QUEUED],
            JobState.CANCELLED,
            {
                "finished_at": repr(time.time()),
                "error": ErrorInfo(code="cancelled", message="cancelled by request").model_dump_json(),
            },
        )
        if ok:
            return JobState.CANCELLED
        if before == JobState.RUNNING.value:
            self.r.hset(keys.job(job_id), "cancel_requested", "1")
            self.emit(job_id, "cancel_requested", {})
        return JobState(before) if before else JobState.CANCELLED

    def cancel_requested(self, job_ids: Sequence[str]) -> set[str]:
        p = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            p.hget(keys.job(job_id), "cancel_requested")
        return {j for j, flag in zip(job_ids, p.execute(), strict=True) if flag}

    def set_progress(self, job_id: str, progress: Mapping[str, Any]) -> None:
        p = self.r.pipeline(transaction=False)
        p.hset(keys.job(job_id), "progress", json.dumps(progress))
        self._event(p, job_id, "progress", dict(progress))
        p.execute()

    # --- events -------------------------------------------------------------------------------

    def count_generated(self, model: str, tokens: int) -> None:
        """Add newly committed work to the model's count of generated tokens (the dashboard's tokens/s).

        Called with the tokens of the results whose commit changed their job (``finish_many``'s answer),
        so a redelivered unit never counts twice.
        """
        if tokens > 0:
            self.r.hincrby(keys.GENERATED_TOKENS, model, tokens)

    def publish_tokens(self, batch: Sequence[tuple[str, int, str]]) -> None:
        """Append streamed token deltas ``(job id, sequence index, text)`` to their jobs' streams."""
        p = self.r.pipeline(transaction=False)
        for job_id, index, text in batch:
            self._event(p, job_id, "token", {"index": index, "text": text})
        p.execute()

    def emit(self, object_id: str, kind: str, data: Mapping[str, Any]) -> None:
        p = self.r.pipeline(transaction=False)
        self._event(p, object_id, kind, data)
        p.execute()

    def _event(self, p: redis.client.Pipeline, object_id: str, kind: str, data: Mapping[str, Any]) -> None:
        key = keys.events(object_id)
        p.xadd(key, {"type": kind, "data": json.dumps(data), "at": repr(time.time())}, maxlen=5000, approximate=True)
        p.expire(key, self.ttl)

    def read_events(
        self, object_id: str, after: str = "0-0", block_ms: int | None = None
    ) -> list[tuple[str, str, Any]]:
        """Events after ``after`` as (event id, type, data); blocks up to ``block_ms`` for new ones."""
        res = self.r.xread({keys.events(object_id): after}, count=500, block=block_ms)
        out: list[tuple[str, str, Any]] = []
        for _key, entries in cast(list[tuple[str, list[tuple[str, dict[str, str]]]]], res or []):
            for eid, f in entries:
                out.append((eid, f.get("type", ""), json.loads(f.get("data", "{}"))))
        return out


def result_url(job_id: str) -> str:
    """The API path of a job's result: what clients see instead of the storage URI the record keeps."""
    return f"/v1/jobs/{job_id}/result"


def public_event(job_id: str, data: dict[str, Any]) -> dict[str, Any]:
    """Event data as clients see it: storage locations that older versions wrote into events stay internal."""
    if "result_uri" in data or "uri" in data:
        data = {k: v for k, v in data.items() if k not in ("result_uri", "uri")}
        if data.get("state") == JobState.SUCCEEDED.value:
            data["result_url"] = result_url(job_id)
    return data


def record_from_raw(data: Mapping[str, str]) -> JobRecord:
    err = data.get("error")
    return JobRecord(
        id=data["id"],
        task=data["task"],
        model=data["model"],
        state=JobState(data["state"]),
        created_at=float(data["created_at"]),
        started_at=float(data["started_at"]) if data.get("started_at") else None,
        finished_at=float(data["finished_at"]) if data.get("finished_at") else None,
        progress=json.loads(data.get("progress") or "{}"),
        error=ErrorInfo.model_validate_json(err) if err else None,
        result_url=result_url(data["id"]) if data.get("result_uri") else None,
        attempts=int(data.get("attempts", "0")),
        priority=int(data.get("priority") or DEFAULT_JOB_PRIORITY),
        metadata=json.loads(data["spec"]).get("metadata", {}) if data.get("spec") else {},
    )
