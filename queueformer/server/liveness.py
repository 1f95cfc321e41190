"""Recovery on heartbeat loss: a dead worker's messages go back to their queue within seconds.

kombu's Redis transport keeps every delivered, unacknowledged message in the ``unacked`` hash (and
its delivery time in ``unacked_index``), keyed by delivery tag, and hands it back only after the
visibility timeout (an hour by default, so that long jobs are not run twice). That timeout bounds how
long a job may run, not how fast a crash is noticed. So each worker also records, per incarnation:

- ``qf:deliveries:<worker>``: the delivery tags it took (running or prefetched), as it receives them;
- ``qf:executing:<worker>``: the jobs and batch lines its engines are running, written *before* they run.

A worker whose fleet heartbeat (``fleet.TTL_S``) is gone in two sweeps ``confirm_s`` apart is dead (the
second look spares a live worker whose heartbeat lapsed while Redis itself restarted: it announces
again within ``fleet.HEARTBEAT_S``). A sweep (every second in the API, one replica at a time) restores
its unacknowledged messages through kombu's own ``restore_by_tag`` and gives a **strike** to each job
or line that was executing when it died: lines that merely waited in its queues take none. A line
struck twice runs alone; a line that kills its worker while running alone is quarantined as
``poison_input`` (see ``workers.lines``).

A message in ``unacked`` that no worker claims (its worker died between taking it and recording it)
is restored once it is ``orphan_after_s`` old.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from queueformer.server import keys

log = logging.getLogger(__name__)

ALONE = "|alone"  # suffix of an executing member that ran alone in its engine
# Deaths while running alone before a line or job is quarantined as poison_input. One is not enough:
# under preemption churn an innocent line struck twice in a batch can be running alone when a third,
# unrelated kill lands (the chaos tests, which kill each new worker at its first commit, hit it about
# one run in three). A real poison input costs one more worker death for this.
QUARANTINE_AFTER_ALONE = 2

Restore = Callable[[list[str]], None]  # put these delivery tags back on their queues (kombu)

# KEYS: the record that must exist, the hash to count in. ARGV: fields to increment by one.
# An ended job or batch whose record expired must not be recreated as a stub holding only strikes.
_STRIKE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV do redis.call('HINCRBY', KEYS[2], ARGV[i], 1) end
return 1
"""


def line_member(batch_id: str, line: int) -> str:
    return f"line:{batch_id}:{line}"


def job_member(job_id: str) -> str:
    return f"job:{job_id}"


class Custody:
    """A worker's side: what it took off the broker and what its engines are running."""

    def __init__(self, client: redis.Redis, worker_id: str) -> None:
        self.r = client
        self.deliveries = keys.worker_deliveries(worker_id)
        self.executing = keys.worker_executing(worker_id)

    def took(self, tag: str) -> None:
        self.r.sadd(self.deliveries, tag)

    def begin(self, members: Iterable[str]) -> None:
        members = list(members)
        if members:
            self.r.sadd(self.executing, *members)

    def end(self, members: Iterable[str]) -> None:
        members = list(members)
        if members:
            self.r.srem(self.executing, *members)

    def clear(self) -> None:
        """A clean exit: nothing of this worker was running when it stopped, so no strikes are due."""
        self.r.delete(self.executing)


@dataclass
class Sweep:
    """What one sweep found and did."""

    dead: list[str] = field(default_factory=list)
    restored: int = 0
    orphans: int = 0
    struck: list[str] = field(default_factory=list)
    skipped: str | None = None


class Liveness:
    """Restores the messages of workers whose heartbeat stopped, and strikes what they were running."""

    def __init__(
        self, client: redis.Redis, restore: Restore, orphan_after_s: float = 60.0, confirm_s: float = 3.0
    ) -> None:
        self.r = client
        self.restore = restore
        self.orphan_after_s = orphan_after_s
        self.confirm_s = confirm_s
        self._strike = client.register_script(_STRIKE)

    def sweep(self, now: float | None = None) -> Sweep:
        lock = self.r.lock(keys.LIVENESS_LOCK, timeout=60)
        if not lock.acquire(blocking=False):
            return Sweep(skipped="another process is sweeping")
        try:
            return self._sweep(time.time() if now is None else now)
        finally:
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()

    def _sweep(self, now: float) -> Sweep:
        report = Sweep()
        workers = {self._worker_of(k, keys.DELIVERIES_PATTERN) for k in self.r.scan_iter(keys.DELIVERIES_PATTERN)}
        workers |= {self._worker_of(k, keys.EXECUTING_PATTERN) for k in self.r.scan_iter(keys.EXECUTING_PATTERN)}
        ordered = sorted(workers)
        p = self.r.pipeline(transaction=False)
        for w in ordered:
            p.exists(keys.worker(w))
        alive = {w for w, up in zip(ordered, p.execute(), strict=True) if up}
        for w in self._confirmed([w for w in ordered if w not in alive], now):
            self._bury(w, report)
        owned = self._prune(sorted(alive))
        self._orphans(owned, now, report)
        return report

    def _confirmed(self, missing: list[str], now: float) -> list[str]:
        """Workers found without a heartbeat now and in a sweep at least ``confirm_s`` earlier."""
        seen = cast(dict[str, str], self.r.hgetall(keys.LIVENESS_SUSPECTS))
        confirmed = [w for w in missing if w in seen and now - float(seen[w]) >= self.confirm_s]
        keep: dict[Any, Any] = {w: seen.get(w, repr(now)) for w in missing if w not in confirmed}
        p = self.r.pipeline()
        p.delete(keys.LIVENESS_SUSPECTS)
        if keep:
            p.hset(keys.LIVENESS_SUSPECTS, mapping=keep)
        p.execute()
        return confirmed

    @staticmethod
    def _worker_of(key: str, pattern: str) -> str:
        return key[len(pattern) - 1 :]

    def _bury(self, worker: str, report: Sweep) -> None:
        """Take a dead worker's records in one transaction (one replica wins), strike, then restore."""
        p = self.r.pipeline(transaction=True)
        p.smembers(keys.worker_deliveries(worker))
        p.smembers(keys.worker_executing(worker))
        p.delete(keys.worker_deliveries(worker), keys.worker_executing(worker))
        tags, executing, _ = p.execute()
        # Strikes first: the restored messages must find them when they are delivered again.
        self._strikes(sorted(cast(set[str], executing)), report)
        restored = self._restore_held(sorted(cast(set[str], tags)))
        report.dead.append(worker)
        report.restored += restored
        log.warning(
            "worker %s stopped its heartbeat: %d of its messages back on their queues, %d running items struck",
            worker,
            restored,
            len(executing),
        )

    def _restore_held(self, tags: list[str]) -> int:
        if not tags:
            return 0
        p = self.r.pipeline(transaction=False)
        for tag in tags:
            p.hexists(keys.UNACKED, tag)
        held = [t for t, there in zip(tags, p.execute(), strict=True) if there]
        if held:
            self.restore(held)
        return len(held)

    def _strikes(self, members: list[str], report: Sweep) -> None:
        p = self.r.pipeline(transaction=False)
        for member in members:
            key, alone = (member[: -len(ALONE)], True) if member.endswith(ALONE) else (member, False)
            kind, _, rest = key.partition(":")
            if kind == "line":
                batch_id, _, line = rest.rpartition(":")
                fields = [line, f"{line}:alone"] if alone else [line]
                self._strike(keys=[keys.batch(batch_id), keys.batch_part(batch_id, "strikes")], args=fields, client=p)
            elif kind == "job":
                fields = ["strikes", "strikes_alone"] if alone else ["strikes"]
                self._strike(keys=[keys.job(rest), keys.job(rest)], args=fields, client=p)
            else:
                continue
            report.struck.append(member)
        p.execute()

    def _prune(self, alive: list[str]) -> set[str]:
        """Drop acknowledged tags from live workers' records; returns every tag a live worker holds."""
        p = self.r.pipeline(transaction=False)
        for w in alive:
            p.smembers(keys.worker_deliveries(w))
        sets = [cast(set[str], s) for s in p.execute()]
        tags = sorted({t for s in sets for t in s})
        if not tags:
            return set()
        p = self.r.pipeline(transaction=False)
        for tag in tags:
            p.hexists(keys.UNACKED, tag)
        gone = {t for t, there in zip(tags, p.execute(), strict=True) if not there}
        if gone:
            p = self.r.pipeline(transaction=False)
            for w, s in zip(alive, sets, strict=True):
                if s & gone:
                    p.srem(keys.worker_deliveries(w), *sorted(s & gone))
            p.execute()
        return set(tags) - gone

    def _orphans(self, owned: set[str], now: float, report: Sweep) -> None:
        old = cast(list[str], self.r.zrangebyscore(keys.UNACKED_INDEX, "-inf", now - self.orphan_after_s))
        orphans = [t for t in old if t not in owned]
        if not orphans:
            return
        # A tag a worker records after the read above is in ``owned`` of the next sweep; read the
        # records again so that a message taken a moment ago is not handed out twice.
        p = self.r.pipeline(transaction=False)
        for key in self.r.scan_iter(keys.DELIVERIES_PATTERN):
            p.smembers(key)
        claimed = {t for s in p.execute() for t in s}
        orphans = [t for t in orphans if t not in claimed]
        report.orphans = self._restore_held(orphans)
        if report.orphans:
            log.warning("%d unacknowledged messages no live worker claims: back on their queues", report.orphans)
