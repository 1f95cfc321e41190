"""Batch-end webhooks: queued in Redis when a batch ends, sent by the API processes off the request path.

**Queue.** The Lua step that moves a batch to an ended status also writes its event
(``qf:webhook:{id}``: receiver URL, body, attempts) and puts it in ``qf:webhooks:due`` (see
:mod:`queueformer.server.batches`), so a batch never ends without its event queued, and no request or
worker waits on a receiver. Every API process runs a :class:`Deliverer` (a thread of ``api/upkeep.py``):
it claims due events atomically (moved to ``qf:webhooks:claimed`` with a lease), so each attempt is
made by one process; a process that dies holding claims leaves them to lapse, and the next claim by
any process takes them back. Times are Redis' (``TIME``), so replicas with skewed clocks agree.

**Attempts.** Each attempt resolves the receiver's host and refuses addresses that are not public
(:mod:`queueformer.server.egress`; an operator allowlist for internal receivers), connects to the
address it checked, and must answer 2xx within ``webhook_timeout_s`` in all. Redirects are not
followed. A failed attempt is retried after ``webhook_backoff_s``, doubling with jitter up to
``webhook_backoff_max_s``, until ``webhook_max_attempts`` attempts or ``webhook_retry_for_s`` after the
batch ended, then dropped; a refused address is never retried. Every outcome is counted
(``queueformer_webhook_deliveries_total{outcome}``) and added to the batch's event stream.

**Format** (Standard Webhooks, the shape OpenAI sends): body ``{"id", "object": "event", "type":
"batch.completed", "created_at", "data": {"id": batch_id}}``; headers ``webhook-id`` (the event id, the
same on every attempt: receivers drop repeats by it), ``webhook-timestamp`` (of the attempt) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed as
:func:`queueformer.contract.settings.webhook_key` reads the secret, so the ``standardwebhooks`` library
verifies it with the ``whsec_`` secret as configured.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import httpcore
import redis

from queueformer.contract import VERSION
from queueformer.contract.errors import QueueformerError
from queueformer.contract.openai_batch import BatchStatus
from queueformer.contract.settings import ApiSettings, webhook_key
from queueformer.server import keys
from queueformer.server.egress import AddressRefused, EgressPolicy, Target, origin_of, post

log = logging.getLogger(__name__)

EVENT_TYPES = {
    BatchStatus.COMPLETED: "batch.completed",
    BatchStatus.FAILED: "batch.failed",
    BatchStatus.CANCELLED: "batch.cancelled",
    BatchStatus.EXPIRED: "batch.expired",
}
OUTCOMES = ("delivered", "retrying", "failed", "refused")

# Claim up to ARGV[1] due events for ARGV[4] (an owner id) until now + ARGV[2] seconds; first hand
# lapsed claims (their process died) back to the due set. Returns [id, claim, id, claim, ...].
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(lapsed) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], now, id)
end
local out = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local key = string.format(ARGV[3], id)
  if redis.call('EXISTS', key) == 1 then
    local n = redis.call('HINCRBY', key, 'attempts', 1)
    local claim = ARGV[4] .. ':' .. n
    redis.call('HSET', key, 'claim', claim)
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), id)
    table.insert(out, id)
    table.insert(out, claim)
  end
end
return out
"""

# End one attempt if ARGV[1]'s claim still holds: ARGV[2] = seconds until the next attempt (or "" when
# none), ARGV[3] = seconds to keep the record after its last attempt, ARGV[4..] = field/value pairs.
_FINISH = """
if redis.call('HGET', KEYS[1], 'claim') ~= ARGV[1] then return 0 end
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('ZREM', KEYS[3], id)
redis.call('HDEL', KEYS[1], 'claim')
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[2] ~= '' then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[2]), id)
else
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
end
return 1
"""


def new_event(batch_id: str, status: BatchStatus) -> tuple[str, str, str] | None:
    """(event id, type, body) of the event a batch ending in ``status`` sends, or None for a status that is no end."""
    kind = EVENT_TYPES.get(status)
    if kind is None:
        return None
    event_id = f"evt_{uuid.uuid4().hex}"
    body = {"id": event_id, "object": "event", "type": kind, "created_at": int(time.time()), "data": {"id": batch_id}}
    return event_id, kind, json.dumps(body, separators=(",", ":"))


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks ``webhook-signature`` value for one attempt."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@dataclass(frozen=True)
class DeliveryConfig:
    """How hard to try: the ``webhook_*`` API settings."""

    connect_timeout_s: float = 3.0
    timeout_s: float = 10.0
    max_attempts: int = 100
    retry_for_s: float = 72 * 3600.0
    backoff_s: float = 10.0
    backoff_max_s: float = 3600.0
    keep_s: int = 7 * 24 * 3600  # how long a delivered or dropped event's record stays readable
    claim_s: float | None = None  # how long a claim holds; None: past one attempt's longest time

    @classmethod
    def from_settings(cls, api: ApiSettings, keep_s: int) -> DeliveryConfig:
        return cls(
            connect_timeout_s=api.webhook_connect_timeout_s,
            timeout_s=api.webhook_timeout_s,
            max_attempts=api.webhook_max_attempts,
            retry_for_s=api.webhook_retry_for_s,
            backoff_s=api.webhook_backoff_s,
            backoff_max_s=api.webhook_backoff_max_s,
            keep_s=keep_s,
        )

    @property
    def lease_s(self) -> float:
        """How long a claim holds: by default past one attempt's longest time, resolving the name included
        (the system resolver's own timeouts), so a live process never loses a claim it is using."""
        return self.claim_s if self.claim_s is not None else self.timeout_s + 60.0

    def backoff(self, attempt: int) -> float:
        """Seconds before the attempt after ``attempt``: doubling from ``backoff_s``, capped, +-10% jitter
        (so receivers that failed together are not retried in lockstep). The schedule is kept in Redis,
        not in a retry loop, so it outlives the process that made the attempt."""
        base = min(self.backoff_max_s, self.backoff_s * 2 ** min(attempt - 1, 40))
        return base * random.uniform(0.9, 1.1)


@dataclass(frozen=True)
class Outcome:
    """What one attempt did."""

    event_id: str
    batch_id: str
    attempt: int
    outcome: str  # one of OUTCOMES
    status_code: int | None = None
    error: str | None = None
    retry_in_s: float | None = None


class WebhookQueue:
    """The events in Redis: claim, read and finish attempts."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)

    def claim(self, n: int, owner: str, lease_s: float) -> list[tuple[str, str]]:
        """Up to ``n`` due events as (event id, claim), each held for ``lease_s``; lapsed claims first go back."""
        flat = self._claim(
            keys=[keys.WEBHOOKS_DUE, keys.WEBHOOKS_CLAIMED], args=[n, repr(lease_s), keys.WEBHOOK_TEMPLATE, owner]
        )
        items = [_text(x) for x in flat]
        return list(zip(items[::2], items[1::2], strict=True))

    def get(self, event_id: str) -> dict[str, str]:
        raw = cast(dict[Any, Any], self.r.hgetall(keys.webhook(event_id)))
        return {_text(k): _text(v) for k, v in raw.items()}

    def finish(self, event_id: str, claim: str, fields: dict[str, str], retry_in_s: float | None, keep_s: int) -> bool:
        """Record an attempt's end and schedule the next (or let the record expire); False if the claim lapsed."""
        flat = [x for kv in fields.items() for x in kv]
        retry = "" if retry_in_s is None else repr(retry_in_s)
        done = self._finish(
            keys=[keys.webhook(event_id), keys.WEBHOOKS_DUE, keys.WEBHOOKS_CLAIMED],
            args=[claim, retry, keep_s, *flat],
        )
        return bool(done)

    def pending(self) -> int:
        """Events waiting for an attempt or in one."""
        p = self.r.pipeline(transaction=False)
        p.zcard(keys.WEBHOOKS_DUE)
        p.zcard(keys.WEBHOOKS_CLAIMED)
        return sum(int(n) for n in p.execute())

    def now(self) -> float:
        seconds, micros = self.r.time()
        return seconds + micros / 1e6


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Deliverer:
    """Sends due webhook events: claims them, makes one attempt each, and schedules what failed."""

    def __init__(
        self,
        client: redis.Redis,
        secret: str | None,
        policy: EgressPolicy,
        config: DeliveryConfig,
        on_outcome: Callable[[Outcome], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.queue = WebhookQueue(client)
        self.r = client
        self.key = webhook_key(secret) if secret else None
        self.policy = policy
        self.config = config
        self.on_outcome = on_outcome
        self.ssl_context = ssl_context
        self.owner = uuid.uuid4().hex[:12]
        self._stop = threading.Event()
        self._wake = threading.Event()

    # --- one attempt --------------------------------------------------------------------------------

    def attempt(self, event_id: str, claim: str) -> Outcome | None:
        """Make the attempt a claim stands for and record its outcome; None if the event is gone."""
        rec = self.queue.get(event_id)
        if not rec:
            return None
        attempt = int(rec.get("attempts") or 1)
        batch_id = rec.get("batch", "")
        status_code: int | None = None
        try:
            target = self.policy.check(rec["url"])
            status_code, error = self._post(target, event_id, rec["body"].encode())
        except AddressRefused as exc:
            log.warning(
                "webhook %s for batch %s to %s refused, not sent: %s", event_id, batch_id, origin_of(rec["url"]), exc
            )
            return self._finish(rec, claim, attempt, "refused", None, str(exc))
        except (QueueformerError, httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except (ssl.SSLError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            return self._finish(rec, claim, attempt, "delivered", status_code, None)
        now = self.queue.now()
        wait = self.config.backoff(attempt)
        elapsed = now - float(rec.get("created_at") or now)
        if attempt >= self.config.max_attempts or elapsed + wait > self.config.retry_for_s:
            log.warning(
                "webhook %s for batch %s to %s dropped after %d attempts: %s",
                event_id,
                batch_id,
                origin_of(rec["url"]),
                attempt,
                error,
            )
            return self._finish(rec, claim, attempt, "failed", status_code, error)
        log.info("webhook %s attempt %d failed (%s); next in %.0f s", event_id, attempt, error, wait)
        return self._finish(rec, claim, attempt, "retrying", status_code, error, wait)

    def _post(self, target: Target, event_id: str, body: bytes) -> tuple[int, str | None]:
        """POST one attempt; (status, why it failed or None)."""
        ts = int(time.time())
        headers = [
            ("content-type", "application/json"),
            ("user-agent", f"queueformer-webhooks/{VERSION}"),
            ("webhook-id", event_id),
            ("webhook-timestamp", str(ts)),
        ]
        if self.key is not None:
            headers.append(("webhook-signature", sign(self.key, event_id, ts, body)))
        resp = post(
            target,
            body,
            headers,
            connect_timeout=self.config.connect_timeout_s,
            timeout=self.config.timeout_s,
            ssl_context=self.ssl_context,
        )
        if 200 <= resp.status < 300:
            return resp.status, None
        if 300 <= resp.status < 400:
            where = origin_of(resp.location) if resp.location else "nowhere"
            return resp.status, f"HTTP {resp.status}: redirects (to {where}) are not followed"
        return resp.status, f"HTTP {resp.status}"

    def _finish(
        self,
        rec: dict[str, str],
        claim: str,
        attempt: int,
        outcome: str,
        status_code: int | None,
        error: str | None,
        retry_in_s: float | None = None,
    ) -> Outcome:
        event_id, batch_id = rec["id"], rec.get("batch", "")
        fields = {
            "status": "pending" if outcome == "retrying" else outcome,
            "last_attempt_at": str(int(time.time())),
            "last_status_code": str(status_code or ""),
            "last_error": (error or "")[:500],
        }
        done = Outcome(event_id, batch_id, attempt, outcome, status_code, error, retry_in_s)
        if not self.queue.finish(event_id, claim, fields, retry_in_s, self.config.keep_s):
            # The claim lapsed and another process took the event: its attempt is the one on record.
            log.warning("webhook %s: attempt %d outlived its claim; not recorded", event_id, attempt)
            return done
        if batch_id:
            self._batch_event(batch_id, done)
        if self.on_outcome is not None:
            self.on_outcome(done)
        return done

    def _batch_event(self, batch_id: str, done: Outcome) -> None:
        data: dict[str, Any] = {"event_id": done.event_id, "attempt": done.attempt, "outcome": done.outcome}
        if done.status_code is not None:
            data["status_code"] = done.status_code
        if done.error:
            data["error"] = done.error[:500]
        if done.retry_in_s is not None:
            data["retry_in_s"] = round(done.retry_in_s, 1)
        key = keys.events(batch_id)
        p = self.r.pipeline(transaction=False)
        p.xadd(
            key, {"type": "webhook", "data": json.dumps(data), "at": repr(time.time())}, maxlen=1000, approximate=True
        )
        p.expire(key, self.config.keep_s, nx=True)  # a stream the batch's own events already keep keeps its TTL
        p.execute()

    # --- the loop -----------------------------------------------------------------------------------

    def run_due(self, limit: int = 100) -> list[Outcome]:
        """Claim what is due now and attempt it here, one after another (for tests and tools)."""
        done = []
        for event_id, claim in self.queue.claim(limit, self.owner, self.config.lease_s):
            outcome = self.attempt(event_id, claim)
            if outcome is not None:
                done.append(outcome)
        return done

    def serve(self, concurrency: int, poll_s: float = 1.0) -> None:
        """Send due events until :meth:`stop`, ``concurrency`` attempts at once; polls every ``poll_s``."""
        free = concurrency
        lock = threading.Lock()

        def release(_: object) -> None:
            nonlocal free
            with lock:
                free += 1
            self._wake.set()

        with ThreadPoolExecutor(concurrency, thread_name_prefix="webhook") as pool:
            while not self._stop.is_set():
                self._wake.clear()
                with lock:
                    n = free
                claimed: list[tuple[str, str]] = []
                if n:
                    try:
                        claimed = self.queue.claim(n, self.owner, self.config.lease_s)
                    except redis.RedisError as exc:
                        log.warning("webhook deliveries paused: Redis is away (%s)", exc)
                    except Exception:  # a bug here must not stop deliveries for the life of the process
                        log.exception("claiming due webhooks failed")
                for event_id, claim in claimed:
                    with lock:
                        free -= 1
                    pool.submit(self._attempt_logged, event_id, claim).add_done_callback(release)
                # Idle, or every slot busy: wait for a slot to free (wake) or the next poll.
                self._wake.wait(poll_s)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _attempt_logged(self, event_id: str, claim: str) -> None:
        try:
            self.attempt(event_id, claim)
        except redis.RedisError as exc:  # the claim lapses and the attempt is made again
            log.warning("webhook %s: Redis is away (%s); it will be sent again", event_id, exc)
        except Exception:  # a bug here must not stop the deliverer
            log.exception("webhook %s: attempt failed unexpectedly", event_id)
