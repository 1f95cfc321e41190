"""The batch lifecycle: every status a batch takes and every move between them, in one place.

::

    validating ──▶ in_progress ──▶ finalizing ──▶ completed | expired
        │               │  ▲                          │
        ▼               ▼  └──────── retry ◀──────────┤
      failed        cancelling ──▶ cancelled ─────────┘

A batch is created by validating its input file (:mod:`queueformer.server.batch_input`) and enqueued as
chunks of lines; workers commit each line exactly once through the ledger
(:mod:`queueformer.server.ledger`). Whoever commits the last line — a worker, a cancel, an expiry, an
API read or the reconciler's audit — finalizes: output and error files are written, the status moves on,
the tenant's enqueued-token quota is released; the move to the end status queues the webhook in
the same step (:mod:`queueformer.server.webhooks` sends it). A finalizer that dies is
replaced once its claim is stale, so no batch stays in ``finalizing``. Status moves are compare-and-set
steps (a Lua script), checked against :data:`MOVES`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

import redis

from queueformer.contract.errors import (
    BrokerUnavailable,
    Conflict,
    ErrorInfo,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    error_from_info,
)
from queueformer.contract.ids import new_id, valid_object_id
from queueformer.contract.openai_batch import ENDPOINTS, BatchCreate, BatchStatus, error_line
from queueformer.contract.settings import TenantQuota
from queueformer.contract.units import LinesUnit
from queueformer.server import keys, webhooks
from queueformer.server.batch_input import Chunk, LineCheck, Scan, TooManyLines, scan_file
from queueformer.server.files import FileStore
from queueformer.server.ledger import Ledger
from queueformer.server.storage import Storage

log = logging.getLogger(__name__)

S = BatchStatus
WINDOW_S = 24 * 3600
FINALIZE_STALE_S = 300
VALIDATING_STALE_S = 600  # validating a 50,000-line file takes about a second

# Every move a batch may make; ``_move`` refuses any other. A move to its own status renews a claim.
MOVES: dict[BatchStatus, frozenset[BatchStatus]] = {
    S.VALIDATING: frozenset({S.IN_PROGRESS, S.FAILED, S.CANCELLING}),
    S.IN_PROGRESS: frozenset({S.FINALIZING, S.CANCELLING}),
    S.FINALIZING: frozenset({S.FINALIZING, S.COMPLETED, S.EXPIRED}),
    S.CANCELLING: frozenset({S.CANCELLING, S.CANCELLED}),
    S.COMPLETED: frozenset({S.IN_PROGRESS}),  # retry
    S.EXPIRED: frozenset({S.IN_PROGRESS}),  # retry
    S.CANCELLED: frozenset({S.IN_PROGRESS}),  # retry
    S.FAILED: frozenset(),
}
OPEN = tuple(s for s in S if not s.ended)
STOPPED = (S.CANCELLING, *(s for s in S if s.ended))  # lines of these batches must stop running

# Move status from one of ARGV[1] (comma list) to ARGV[2], stamping ARGV[3] = now into the ARGV[4]
# fields that follow. A move that ends the batch also queues its webhook event in the same step when
# the batch has a webhook_url: KEYS[2] the due set, KEYS[3] the event record, and after the stamps the
# event's id, type and body (see queueformer.server.webhooks).
_STATUS = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, ''} end
if string.find(',' .. ARGV[1] .. ',', ',' .. cur .. ',', 1, true) == nil then return {0, cur} end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
local n = tonumber(ARGV[4])
for i = 5, 4 + n do redis.call('HSET', KEYS[1], ARGV[i], ARGV[3]) end
if #KEYS == 3 then
  local url = redis.call('HGET', KEYS[1], 'webhook_url')
  if url and url ~= '' then
    local id = ARGV[5 + n]
    local t = redis.call('TIME')
    redis.call('HSET', KEYS[3], 'id', id, 'type', ARGV[6 + n], 'body', ARGV[7 + n], 'url', url,
      'batch', redis.call('HGET', KEYS[1], 'id'), 'tenant', redis.call('HGET', KEYS[1], 'tenant'),
      'created_at', t[1] .. '.' .. string.format('%06d', tonumber(t[2])), 'attempts', 0, 'status', 'pending')
    redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000, id)
    redis.call('HSET', KEYS[1], 'webhook_event', id)
  end
end
return {1, cur}
"""

# Add ARGV[1] to the sorted set KEYS[1] with a score above every other member's: the creation time in
# microseconds, or one more than the newest when two batches share it, so listings are strictly
# newest-first however close together batches are created.
_LIST_ADD = """
local top = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local score = tonumber(ARGV[2])
if top[2] and tonumber(top[2]) >= score then score = tonumber(top[2]) + 1 end
redis.call('ZADD', KEYS[1], score, ARGV[1])
return 1
"""

Publish = Callable[[list[LinesUnit]], None]


class Batches:
    """Batch records and their lifecycle: create, validate, run, finalize, cancel, expire, retry."""

    def __init__(
        self,
        client: redis.Redis,
        storage: Storage,
        files: FileStore,
        ttl_s: int = 30 * 24 * 3600,
    ) -> None:
        self.r = client
        self.storage = storage
        self.files = files
        self.ttl = ttl_s
        self.ledger = Ledger(client, storage, files)
        self._status = client.register_script(_STATUS)
        self._list_add = client.register_script(_LIST_ADD)

    # --- reads --------------------------------------------------------------------------------------

    def raw(self, batch_id: str) -> dict[str, str]:
        data = cast(dict[str, str], self.r.hgetall(keys.batch(batch_id)))
        if not data:
            raise NotFound(f"batch {batch_id!r} not found", param="batch_id")
        return data

    def get_raw(self, batch_id: str, tenant: str | None) -> dict[str, str]:
        if not valid_object_id(batch_id):
            raise NotFound(f"batch {batch_id!r} not found", param="batch_id")
        data = self.raw(batch_id)
        if tenant is not None and data.get("tenant") != tenant:
            raise NotFound(f"batch {batch_id!r} not found", param="batch_id")
        return data

    def page(self, tenant: str, after: str | None, limit: int) -> tuple[list[dict[str, str]], bool]:
        ids = cast(list[str], self.r.zrevrange(keys.tenant_batches(tenant), 0, -1))
        if after is not None:
            if after not in ids:
                raise NotFound(
                    f"batch {after!r} not found: `after` takes the id of a batch in your listing "
                    "(the last_id of the previous page)",
                    param="after",
                )
            ids = ids[ids.index(after) + 1 :]
        page = ids[: limit + 1]
        p = self.r.pipeline(transaction=False)
        for batch_id in page[:limit]:
            p.hgetall(keys.batch(batch_id))
        return [d for d in p.execute() if d], len(page) > limit

    def open_count(self, tenant: str) -> int:
        return int(self.r.scard(keys.tenant_open_batches(tenant)))

    @staticmethod
    def remaining(raw: dict[str, str]) -> int:
        return int(raw.get("total", 0)) - int(raw.get("completed", 0)) - int(raw.get("failed", 0))

    def stopped(self, batch_ids: list[str]) -> set[str]:
        """Batches whose lines must stop running (cancelled, expired or otherwise over)."""
        p = self.r.pipeline(transaction=False)
        for batch_id in batch_ids:
            p.hget(keys.batch(batch_id), "status")
        return {b for b, st in zip(batch_ids, p.execute(), strict=True) if st is None or st in STOPPED}

    def partial_output(self, batch_id: str, errors: bool = False) -> bytes:
        """Committed lines so far (after any earlier output file), for downloads while in progress."""
        raw = self.raw(batch_id)
        parts: list[bytes] = []
        prev = raw.get("prev_output_file_id") if not errors else None
        if prev:
            try:
                parts.append(self.storage.get_bytes(self.files.key(prev)))
            except NotFound:  # deleted or expired since: a retry's output holds only its own lines
                log.warning("batch %s: earlier output file %s is gone", batch_id, prev)
        lines = self.ledger.lines_so_far(batch_id, errors)
        if not lines and not errors and raw.get("output_file_id"):
            return self.storage.get_bytes(self.files.key(raw["output_file_id"]))
        return b"".join([*parts, *lines])

    # --- moves --------------------------------------------------------------------------------------

    def _move(self, batch_id: str, allowed: Iterable[BatchStatus], to: BatchStatus, *stamps: str) -> bool:
        """Compare-and-set the status from one of ``allowed`` to ``to``, stamping ``stamps`` with now."""
        allowed = tuple(allowed)
        illegal = [a for a in allowed if to not in MOVES[a]]
        if illegal:
            raise AssertionError(f"a batch never moves from {illegal} to {to}")
        csv = ",".join(s.value for s in allowed)
        names = [keys.batch(batch_id)]
        args = [csv, to.value, str(int(time.time())), str(len(stamps)), *stamps]
        event = webhooks.new_event(batch_id, to)
        if event is not None:  # an end: its webhook is queued in the same step, if the batch has one
            names += [keys.WEBHOOKS_DUE, keys.webhook(event[0])]
            args += event
        ok, _ = self._status(keys=names, args=args)
        if ok:
            self._event(batch_id, {"status": to.value})
        return bool(ok)

    def _event(self, batch_id: str, data: dict[str, Any]) -> None:
        key = keys.events(batch_id)
        p = self.r.pipeline(transaction=False)
        p.xadd(
            key, {"type": "status", "data": json.dumps(data), "at": repr(time.time())}, maxlen=1000, approximate=True
        )
        p.expire(key, self.ttl)
        p.execute()

    # --- create and validate ------------------------------------------------------------------------

    def create(
        self,
        body: BatchCreate,
        tenant: str,
        quota: TenantQuota,
        check_line: LineCheck,
        chunk_size: Callable[[list[str]], int],
        publish: Publish,
    ) -> dict[str, str]:
        """Validate the input file, record the batch, plan its chunks and enqueue them.

        ``check_line`` adds the caller's rules for one line (registry, context window), ``chunk_size``
        gives lines per chunk for the batch's models, ``publish`` sends work units. If publishing
        fails, the batch is cancelled with every line failed as ``broker_unavailable``.
        """
        if body.endpoint not in ENDPOINTS:
            raise InvalidInput(
                f"endpoint {body.endpoint!r} is not supported; supported: {', '.join(ENDPOINTS)}", param="endpoint"
            )
        file = self.files.get(body.input_file_id, tenant)
        if file.purpose != "batch":
            raise InvalidInput(
                f"file {file.id} has purpose {file.purpose!r}; batches need purpose 'batch'", param="input_file_id"
            )
        if self.open_count(tenant) >= quota.max_open_batches:
            raise QuotaExceeded(f"tenant has {quota.max_open_batches} open batches; wait for one to finish")
        try:
            scan = scan_file(
                self.storage,
                self.files.key(file.id),
                body.endpoint,
                quota.max_lines_per_batch,
                check_line,
                max_line_bytes=quota.max_line_bytes,
            )
        except TooManyLines as exc:
            raise PayloadTooLarge(f"{exc}; the limit is {exc.limit} lines per batch", param="input_file_id") from None
        if scan.tokens:
            enqueued = int(cast(str | None, self.r.get(keys.tenant_tokens(tenant))) or 0)
            if enqueued + scan.tokens > quota.max_enqueued_tokens:
                raise QuotaExceeded(
                    f"the batch holds about {scan.tokens} tokens and {enqueued} are enqueued; "
                    f"the limit is {quota.max_enqueued_tokens}",
                    details={"enqueued_tokens": enqueued, "limit": quota.max_enqueued_tokens},
                )
        batch_id = new_id("batch")
        self._record(batch_id, tenant, body)
        self._start(batch_id, scan, scan.chunks(chunk_size(scan.models)), tenant)
        if self.raw(batch_id)["status"] == S.IN_PROGRESS:
            try:
                publish(self.ledger.units(batch_id))
            except Exception as exc:
                self._move(batch_id, [S.IN_PROGRESS], S.CANCELLING, "cancelling_at")
                self.ledger.close_all(batch_id, "broker_unavailable", "the batch could not be enqueued")
                self.maybe_finalize(batch_id)
                raise BrokerUnavailable(f"could not enqueue batch {batch_id}: {exc}") from exc
        return self.raw(batch_id)

    def _record(self, batch_id: str, tenant: str, body: BatchCreate) -> None:
        now = int(time.time())
        fields: dict[Any, Any] = {
            "id": batch_id,
            "tenant": tenant,
            "endpoint": body.endpoint,
            "input_file_id": body.input_file_id,
            "completion_window": body.completion_window,
            "status": S.VALIDATING.value,
            "created_at": str(now),
            "expires_at": str(now + WINDOW_S),
            "total": "0",
            "completed": "0",
            "failed": "0",
            "input_tokens": "0",
            "output_tokens": "0",
            "metadata": json.dumps(body.metadata),
            "webhook_url": body.webhook_url or "",
        }
        if body.output_expires_after is not None:
            fields["output_expires_after_s"] = str(body.output_expires_after.seconds)
        p = self.r.pipeline()
        p.hset(keys.batch(batch_id), mapping=fields)
        self._list_add(keys=[keys.tenant_batches(tenant)], args=[batch_id, time.time_ns() // 1000], client=p)
        p.sadd(keys.tenant_open_batches(tenant), batch_id)
        p.sadd(keys.OPEN_BATCHES, batch_id)
        p.execute()

    def _start(self, batch_id: str, scan: Scan, chunks: list[Chunk], tenant: str) -> None:
        """Record what validation found and move to ``in_progress`` (or ``failed`` if nothing can run)."""
        p = self.r.pipeline()
        p.hset(
            keys.batch(batch_id),
            mapping={
                "total": str(len(scan.lines)),
                "model": scan.models[0] if len(scan.models) == 1 else "",
                "models": json.dumps(scan.models),
                "tokens": str(scan.tokens),
                "chunks": str(len(chunks)),
                "errors": json.dumps(
                    [
                        {"code": e.code, "message": e.message, "param": e.param, "line": idx + 1}
                        for idx, _cid, e in scan.errors[:1000]
                    ]
                ),
            },
        )
        self.ledger.plan(p, batch_id, chunks)
        if scan.tokens:
            p.incrby(keys.tenant_tokens(tenant), scan.tokens)
        p.execute()
        self.ledger.commit_many(
            batch_id,
            [
                (
                    idx,
                    "err",
                    error_line(cid or f"line-{idx + 1}", ErrorInfo(code=e.code, message=e.message, param=e.param), 400),
                    0,
                    0,
                )
                for idx, cid, e in scan.errors
            ],
        )
        if len(scan.errors) == len(scan.lines):
            reason = (
                "the input file has no requests" if not scan.lines else "no line of the input file is a valid request"
            )
            self.fail_validation(batch_id, reason)
            return
        self._move(batch_id, [S.VALIDATING], S.IN_PROGRESS, "in_progress_at")

    def fail_validation(self, batch_id: str, message: str) -> None:
        raw = self.raw(batch_id)
        errors = json.loads(raw.get("errors") or "[]")
        errors.insert(0, {"code": "invalid_file", "message": message, "param": "input_file_id", "line": None})
        self.r.hset(keys.batch(batch_id), "errors", json.dumps(errors))
        self._move(batch_id, [S.VALIDATING], S.FAILED, "failed_at")
        if int(raw.get("failed", "0")):
            self._write_files(batch_id, raw)
        self._close(batch_id, raw)

    # --- ending -------------------------------------------------------------------------------------

    def cancel(self, batch_id: str) -> None:
        if not self._move(batch_id, [S.VALIDATING, S.IN_PROGRESS], S.CANCELLING, "cancelling_at"):
            status = self.raw(batch_id).get("status")
            if status in (S.CANCELLING, S.CANCELLED):
                return
            raise Conflict(f"batch {batch_id} is {status}; only a running batch can be cancelled")
        self.ledger.close_all(batch_id, "batch_cancelled", "the batch was cancelled before this request ran")
        self.maybe_finalize(batch_id)

    def maybe_expire(self, batch_id: str, raw: dict[str, str] | None = None) -> bool:
        raw = raw or self.raw(batch_id)
        if raw.get("status") != S.IN_PROGRESS or time.time() < int(raw.get("expires_at", "0")):
            return False
        self.ledger.close_all(
            batch_id, "batch_expired", "This request could not be executed before the completion window expired."
        )
        self.r.hset(keys.batch(batch_id), "expiring", "1")
        self.maybe_finalize(batch_id)
        return True

    def maybe_finalize(self, batch_id: str) -> bool:
        """Finalize if nothing remains and no live finalizer holds the batch; safe to call anytime."""
        raw = self.raw(batch_id)
        if self.remaining(raw) > 0:
            return False
        status = raw.get("status")
        now = int(time.time())
        if status == S.FINALIZING:
            if now - int(raw.get("finalizing_at", now)) < FINALIZE_STALE_S:
                return False
            claimed = self._move(batch_id, [S.FINALIZING], S.FINALIZING, "finalizing_at")
        elif status == S.CANCELLING:
            claimed = self._move(batch_id, [S.CANCELLING], S.CANCELLING, "cancelling_at")
        else:
            claimed = self._move(batch_id, [S.IN_PROGRESS], S.FINALIZING, "finalizing_at")
        if not claimed:
            return False
        raw = self.raw(batch_id)
        self._write_files(batch_id, raw)
        if status == S.CANCELLING:
            self._move(batch_id, [S.CANCELLING], S.CANCELLED, "cancelled_at")
        elif raw.get("expiring"):
            self._move(batch_id, [S.FINALIZING], S.EXPIRED, "expired_at")
        else:
            self._move(batch_id, [S.FINALIZING], S.COMPLETED, "completed_at")
        self._close(batch_id, raw)
        return True

    def refresh(self, batch_id: str, raw: dict[str, str]) -> bool:
        """Lazy upkeep on read: expire a batch past its window; finish one whose finalizer died."""
        if raw["status"] == S.IN_PROGRESS and time.time() > int(raw.get("expires_at", "0")):
            return self.maybe_expire(batch_id, raw)
        if raw["status"] in (S.IN_PROGRESS, S.FINALIZING) and self.remaining(raw) == 0:
            return self.maybe_finalize(batch_id)
        return False

    def tend(self, batch_id: str, raw: dict[str, str], now: float, stale_s: float) -> bool:
        """Move on a batch whose mover died: a finalizer, a cancel or a validation cut short."""
        status = raw.get("status")
        since = {S.VALIDATING: "created_at", S.CANCELLING: "cancelling_at"}.get(S(status) if status else S.FAILED)
        if since is not None and now - int(raw.get(since) or now) > max(stale_s, VALIDATING_STALE_S):
            if status == S.VALIDATING:
                self.fail_validation(batch_id, "validation was interrupted; create the batch again")
            else:
                self.ledger.close_all(batch_id, "batch_cancelled", "the batch was cancelled before this request ran")
                self.maybe_finalize(batch_id)
            return True
        if status == S.IN_PROGRESS and now > int(raw.get("expires_at") or now + 1):
            return self.maybe_expire(batch_id, raw)
        if status in (S.IN_PROGRESS, S.FINALIZING) and self.remaining(raw) == 0:
            return self.maybe_finalize(batch_id)
        return False

    def close_unit(self, unit: LinesUnit, code: str, message: str) -> int:
        """End a unit's uncommitted lines as errors (work that can never run), finalizing if that was all."""
        n = self.ledger.close_unit(unit, code, message)
        self.maybe_finalize(unit.batch)
        return n

    def _write_files(self, batch_id: str, raw: dict[str, str]) -> None:
        tenant = raw["tenant"]
        ttl = raw.get("output_expires_after_s")
        expires_after_s = int(ttl) if ttl else None
        out = self.partial_output(batch_id)
        out_file = self.files.create_bytes(tenant, f"{batch_id}_output.jsonl", "batch_output", out, expires_after_s)
        fields: dict[Any, Any] = {"output_file_id": out_file.id}
        errs = self.partial_output(batch_id, errors=True)
        if errs:
            fields["error_file_id"] = self.files.create_bytes(
                tenant, f"{batch_id}_error.jsonl", "batch_output", errs, expires_after_s
            ).id
        p = self.r.pipeline()
        p.hset(keys.batch(batch_id), mapping=fields)
        p.hdel(keys.batch(batch_id), "prev_output_file_id")
        # The output now lives in its file; the done bitmap keeps commits exactly-once from here on.
        p.delete(keys.batch_part(batch_id, "out"))
        p.execute()

    def _close(self, batch_id: str, raw: dict[str, str]) -> None:
        p = self.r.pipeline()
        tokens = int(raw.get("tokens") or 0)
        if tokens:
            p.decrby(keys.tenant_tokens(raw["tenant"]), tokens)
            p.hset(keys.batch(batch_id), "tokens", "0")
        p.srem(keys.tenant_open_batches(raw["tenant"]), batch_id)
        p.srem(keys.OPEN_BATCHES, batch_id)
        p.hdel(keys.batch(batch_id), "expiring")
        p.expire(keys.batch(batch_id), self.ttl)
        for part in keys.BATCH_PARTS:
            p.expire(keys.batch_part(batch_id, part), self.ttl)
        p.execute()

    # --- retry --------------------------------------------------------------------------------------

    def retry(self, batch_id: str, codes: set[str] | None, publish: Publish, every: bool = False) -> list[int]:
        """Reopen a finished batch for some of its failed lines and enqueue them.

        By default the lines whose failure may go differently on a new run: not those a request error
        (a 4xx answer that is not retryable, such as an invalid body or an unknown model) failed, which
        would fail the same way again. ``codes`` picks lines by error code instead; ``every`` takes all.
        Nothing to pick is a ``Conflict`` that says why.
        """
        raw = self.raw(batch_id)
        if not S(raw.get("status", S.FAILED)).retryable:
            raise Conflict(f"batch {batch_id} is {raw.get('status')}; only a finished batch can be retried")
        picked, kept = [], 0
        for line, data in self.ledger.error_lines(batch_id).items():
            response = data.get("response") or {}
            code = (data.get("error") or {}).get("code") or (response.get("body") or {}).get("error", {}).get("code")
            if (
                every
                or (codes is not None and code in codes)
                or (codes is None and not _deterministic(response.get("status_code"), code))
            ):
                picked.append(line)
            else:
                kept += 1
        if not picked:
            why = (
                f"no failed line has an error code in {sorted(codes)}"
                if codes is not None
                else f"its {kept} failed lines are request errors that would fail again (pass all to re-run them)"
                if kept
                else "it has no failed lines"
            )
            raise Conflict(f"nothing to retry in batch {batch_id}: {why}", param="codes" if codes else None)
        p = self.r.pipeline()
        self.ledger.reopen(p, batch_id, picked)
        now = int(time.time())
        p.hincrby(keys.batch(batch_id), "failed", -len(picked))
        p.hset(
            keys.batch(batch_id),
            mapping={
                "prev_output_file_id": raw.get("output_file_id", ""),
                "expires_at": str(now + WINDOW_S),
                "status": S.IN_PROGRESS.value,
                "in_progress_at": str(now),
            },
        )
        p.hdel(
            keys.batch(batch_id),
            "output_file_id",
            "error_file_id",
            "completed_at",
            "expired_at",
            "cancelled_at",
            "cancelling_at",
            "finalizing_at",
        )
        p.sadd(keys.tenant_open_batches(raw["tenant"]), batch_id)
        p.sadd(keys.OPEN_BATCHES, batch_id)
        p.execute()
        self._event(batch_id, {"status": S.IN_PROGRESS.value, "retried_lines": len(picked)})
        publish(self.ledger.units(batch_id, only=set(picked)))
        return sorted(picked)


def _deterministic(status_code: Any, code: str | None) -> bool:
    """Whether a line failed on its request alone (a client error that is not retryable): it would again."""
    if not isinstance(status_code, int) or not 400 <= status_code < 500:
        return False
    return not (code and error_from_info(ErrorInfo(code=code, message="")).retryable)


def to_openai(raw: dict[str, str]) -> dict[str, Any]:
    """The OpenAI Batch object for a stored batch."""

    def ts(name: str) -> int | None:
        value = raw.get(name)
        return int(value) if value else None

    errors = json.loads(raw.get("errors") or "[]")
    input_tokens, output_tokens = int(raw.get("input_tokens", 0)), int(raw.get("output_tokens", 0))
    return {
        "id": raw["id"],
        "object": "batch",
        "endpoint": raw["endpoint"],
        "model": raw.get("model") or None,
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": raw["input_file_id"],
        "completion_window": raw.get("completion_window", "24h"),
        "status": raw["status"],
        "output_file_id": raw.get("output_file_id") or None,
        "error_file_id": raw.get("error_file_id") or None,
        "created_at": int(raw["created_at"]),
        "in_progress_at": ts("in_progress_at"),
        "expires_at": ts("expires_at"),
        "finalizing_at": ts("finalizing_at"),
        "completed_at": ts("completed_at"),
        "failed_at": ts("failed_at"),
        "expired_at": ts("expired_at"),
        "cancelling_at": ts("cancelling_at"),
        "cancelled_at": ts("cancelled_at"),
        "request_counts": {
            "total": int(raw.get("total", 0)),
            "completed": int(raw.get("completed", 0)),
            "failed": int(raw.get("failed", 0)),
        },
        "metadata": json.loads(raw.get("metadata") or "null"),
        "webhook_url": raw.get("webhook_url") or None,  # extension: where the end-of-batch event goes
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }
