"""Accepted work whose broker message is gone is sent again.

kombu's Redis transport pops a message (BRPOP) before it records it as unacknowledged, so a worker
killed between the two loses the message: no queue and no ``unacked`` entry holds it any more, and
its jobs or batch lines would wait forever (kombu#305, celery#7950). Under load that window lasts
hundreds of milliseconds, and a pod killed right after finishing a unit, while it fetches the next,
lands in it. A unit whose task failed outright is acknowledged and gone too.

Job records and the batch ledger are the system of record, so they are checked against the broker.
Open work that has made no progress for ``after_s`` and that no queued or unacknowledged message
names, in two audits at least ``confirm_s`` apart, is published again. Commits are idempotent and
every delivery counts towards quarantine, so a false alarm costs a repeated delivery, never a
duplicate result or an endless loop.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from queueformer.contract.errors import WorkerLost
from queueformer.contract.priority import DEFAULT_JOB_PRIORITY
from queueformer.contract.units import RUN_TASK, JobsUnit, LinesUnit, job_units
from queueformer.server import keys
from queueformer.server.batches import Batches
from queueformer.server.jobs import JobStore

log = logging.getLogger(__name__)

JOBS_PER_MESSAGE = 128

Send = Callable[[JobsUnit | LinesUnit, str], None]
QueueFor = Callable[[str, str], str]  # (model, tenant) -> queue


@dataclass
class Audit:
    """What one audit found and did."""

    checked_jobs: int = 0
    checked_units: int = 0
    scanned_messages: int = 0
    suspects: int = 0
    resent_jobs: list[str] = field(default_factory=list)
    resent_units: list[str] = field(default_factory=list)
    ended_jobs: list[str] = field(default_factory=list)  # sent again too often: failed as worker_lost
    ended_units: list[str] = field(default_factory=list)
    tended_batches: list[str] = field(default_factory=list)  # finalized, expired, cancelled or failed here
    skipped: str | None = None


@dataclass
class _Open:
    """Open work that is old enough to check: jobs by id, batch units by key."""

    jobs: dict[str, dict[str, str]] = field(default_factory=dict)  # id -> record
    units: dict[str, tuple[LinesUnit, str]] = field(default_factory=dict)  # key -> (unit, queue)

    @property
    def queues(self) -> set[str]:
        return {r["queue"] for r in self.jobs.values() if r.get("queue")} | {q for _, q in self.units.values()}


def unit_key(unit: LinesUnit) -> str:
    return f"lines:{unit.batch}:{unit.chunk}:{unit.model}"


def unit_of(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The work unit a kombu message carries (Celery protocol 2), or None for anything else."""
    if (payload.get("headers") or {}).get("task") != RUN_TASK:
        return None
    body = payload.get("body")
    if (payload.get("properties") or {}).get("body_encoding") == "base64" and isinstance(body, str):
        body = base64.b64decode(body)
    try:
        _args, kwargs, _embed = json.loads(body)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    unit = (kwargs or {}).get("unit")
    return unit if isinstance(unit, dict) else None


class Reconciler:
    """Audits open jobs and batch units against the broker and re-sends what no message holds."""

    def __init__(
        self,
        client: redis.Redis,
        jobs: JobStore,
        batches: Batches,
        queue_for: QueueFor,
        send: Send,
        *,
        after_s: float = 60.0,
        confirm_s: float = 30.0,
        max_scan: int = 200_000,
        max_jobs: int = 10_000,
        max_resends: int = 3,
    ) -> None:
        self.r = client
        self.jobs = jobs
        self.batches = batches
        self.queue_for = queue_for
        self.send = send
        self.after_s = after_s
        self.confirm_s = confirm_s
        self.max_scan = max_scan
        self.max_jobs = max_jobs
        self.max_resends = max_resends

    def audit(self, now: float | None = None) -> Audit:
        """One pass; several API replicas may call it, one of them audits at a time."""
        lock = self.r.lock(keys.RECONCILE_LOCK, timeout=max(600.0, 4 * self.confirm_s))
        if not lock.acquire(blocking=False):
            return Audit(skipped="another process is auditing")
        try:
            if now is None:
                sec, usec = self.r.time()  # one clock for every replica
                now = sec + usec / 1e6
            return self._audit(now)
        finally:
            # It may have expired while a very long audit ran; the next audit takes it again.
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()

    def _audit(self, now: float) -> Audit:
        report = Audit()
        work = self._stale(now, report)
        report.checked_jobs, report.checked_units = len(work.jobs), len(work.units)
        if not work.jobs and not work.units:
            self.r.delete(keys.RECONCILE_SUSPECTS)
            return report
        listed = self._listed(work.queues)
        if listed is None:
            self.r.delete(keys.RECONCILE_SUSPECTS)  # a later sighting must not pair with one this old
            report.skipped = f"the broker holds more than {self.max_scan} messages; not scanned"
            return report
        present_jobs, present_units, report.scanned_messages = listed
        # Read the state again after the scan: work that finished meanwhile was acknowledged, not lost.
        missing_jobs = self._still_open([j for j in work.jobs if j not in present_jobs])
        missing_units = self._still_unfinished([k for k in work.units if k not in present_units], work)
        suspects = [f"job:{j}" for j in missing_jobs] + missing_units
        report.suspects = len(suspects)
        confirmed = self._confirm(suspects, now)
        jobs = [j for j in missing_jobs if f"job:{j}" in confirmed]
        units = [k for k in missing_units if k in confirmed]
        if jobs or units:
            self._resend(jobs, units, work, report)
            log.warning(
                "re-sent %d jobs and %d batch chunks that no broker message held (lost in delivery); "
                "ended %d jobs and %d chunks sent again %d times already",
                len(report.resent_jobs),
                len(report.resent_units),
                len(report.ended_jobs),
                len(report.ended_units),
                self.max_resends,
            )
        return report

    # --- what is open -------------------------------------------------------------------------------

    def _stale(self, now: float, report: Audit) -> _Open:
        work = _Open()
        ids = cast(
            list[str], self.r.zrangebyscore(keys.OPEN_JOBS, "-inf", now - self.after_s, start=0, num=self.max_jobs)
        )
        gone = []
        for job_id, record in zip(ids, self.jobs.raw_many(ids), strict=True):
            if not record or record.get("state") not in ("queued", "running"):
                gone.append(job_id)  # expired, or ended before the index existed
            else:
                work.jobs[job_id] = record
        if gone:
            self.r.zrem(keys.OPEN_JOBS, *gone)
        for batch_id, raw in self._open_batches():
            try:
                if self.batches.tend(batch_id, raw, now, self.after_s):
                    report.tended_batches.append(batch_id)
                    continue
                if raw.get("status") != "in_progress":
                    continue
                last = max(int(raw.get(f) or 0) for f in ("progress_at", "in_progress_at", "created_at"))
                if now - last < self.after_s:
                    continue
                for unit in self.batches.ledger.open_units(batch_id):
                    work.units[unit_key(unit)] = (unit, self.queue_for(unit.model, raw["tenant"]))
            except Exception:  # one broken batch (its input file deleted, its model gone) must not stop the rest
                log.exception("audit of batch %s failed", batch_id)
        return work

    def _open_batches(self) -> Iterable[tuple[str, dict[str, str]]]:
        batch_ids = sorted(cast(set[str], self.r.smembers(keys.OPEN_BATCHES)))
        p = self.r.pipeline(transaction=False)
        for batch_id in batch_ids:
            p.hgetall(keys.batch(batch_id))
        gone = []
        for batch_id, raw in zip(batch_ids, p.execute(), strict=True):
            if raw:
                yield batch_id, raw
            else:
                gone.append(batch_id)
        if gone:
            self.r.srem(keys.OPEN_BATCHES, *gone)

    def _still_open(self, job_ids: list[str]) -> list[str]:
        return [
            j
            for j, rec in zip(job_ids, self.jobs.raw_many(job_ids), strict=True)
            if rec and rec.get("state") in ("queued", "running")
        ]

    def _still_unfinished(self, keys: list[str], work: _Open) -> list[str]:
        batches = {work.units[k][0].batch for k in keys}
        left = {unit_key(u) for b in sorted(batches) for u in self.batches.ledger.open_units(b)}
        return [k for k in keys if k in left]

    # --- what the broker holds ----------------------------------------------------------------------

    def _listed(self, queues: set[str]) -> tuple[set[str], set[str], int] | None:
        """Job ids and unit keys named by messages waiting in ``queues`` or delivered and unacknowledged."""
        names = [name for q in sorted(queues) for name in keys.queue_lists(q)]
        p = self.r.pipeline(transaction=False)
        for name in names:
            p.llen(name)
        p.hlen(keys.UNACKED)
        if sum(int(n) for n in p.execute()) > self.max_scan:
            return None
        # Queues first, then unacknowledged: a message taken by a consumer between the two reads, or
        # handed back from a dead worker's entry, can be missed once; the second audit tells it apart.
        p = self.r.pipeline(transaction=False)
        for name in names:
            p.lrange(name, 0, -1)
        raws = [m for msgs in p.execute() for m in msgs]
        payloads = [self._load(m) for m in raws]
        for entry in cast(list[str], self.r.hvals(keys.UNACKED)):
            loaded = self._load(entry)
            payloads.append(loaded[0] if isinstance(loaded, list) and loaded else None)
        jobs: set[str] = set()
        units: set[str] = set()
        for payload in payloads:
            unit = unit_of(payload) if isinstance(payload, dict) else None
            if unit is None:
                continue
            if unit.get("kind") == "lines":
                try:
                    units.add(unit_key(LinesUnit.model_validate(unit)))
                except ValueError:
                    continue
            else:
                jobs.update(str(i) for i in unit.get("ids") or [])
        return jobs, units, len(payloads)

    @staticmethod
    def _load(raw: str) -> Any:
        try:
            return json.loads(raw)
        except ValueError:
            return None

    # --- two sightings, then send -------------------------------------------------------------------

    def _confirm(self, suspects: list[str], now: float) -> set[str]:
        """Suspects also missing in an audit at least ``confirm_s`` earlier; the rest are remembered."""
        before = cast(dict[str, str], self.r.hgetall(keys.RECONCILE_SUSPECTS))
        confirmed = {k for k in suspects if k in before and now - float(before[k]) >= self.confirm_s}
        keep: dict[Any, Any] = {k: before.get(k, repr(now)) for k in suspects if k not in confirmed}
        p = self.r.pipeline()
        p.delete(keys.RECONCILE_SUSPECTS)
        if keep:
            p.hset(keys.RECONCILE_SUSPECTS, mapping=keep)
        p.execute()
        return confirmed

    def _resend(self, job_ids: list[str], unit_keys: list[str], work: _Open, report: Audit) -> None:
        """Send again, or end as ``worker_lost`` what was sent again ``max_resends`` times already.

        Work can fail before it counts a delivery (its model cannot load, its input file is gone) and be
        acknowledged: sending it again forever would be a loop, so the audit ends it instead.
        """
        suspects = [f"job:{j}" for j in job_ids] + unit_keys
        p = self.r.pipeline(transaction=False)
        for key in suspects:
            p.hincrby(keys.RECONCILE_RESENT, key, 1)
        p.expire(keys.RECONCILE_RESENT, 7 * 24 * 3600)
        times = dict(zip(suspects, (int(n) for n in p.execute()[:-1]), strict=True))
        lost = WorkerLost(f"no worker finished this after it was sent again {self.max_resends} times")
        groups: dict[tuple[str, str, str, int], list[str]] = defaultdict(list)
        for job_id in job_ids:
            if times[f"job:{job_id}"] > self.max_resends:
                self.jobs.fail(job_id, lost.info())
                report.ended_jobs.append(job_id)
                continue
            rec = work.jobs[job_id]
            priority = int(rec.get("priority") or DEFAULT_JOB_PRIORITY)
            groups[(rec["model"], rec["queue"], rec.get("task", ""), priority)].append(job_id)
            report.resent_jobs.append(job_id)
        for unit, queue in job_units(groups, JOBS_PER_MESSAGE):
            self.send(unit, queue)
        for key in unit_keys:
            lines, queue = work.units[key]
            if times[key] > self.max_resends:
                self.batches.close_unit(lines, lost.code, lost.message)
                report.ended_units.append(key)
            else:
                self.send(lines, queue)
                report.resent_units.append(key)
