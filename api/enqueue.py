"""Accepting work: check it against the registry and quotas, record it, then publish it.

Records are written before messages, in one pipelined round trip; messages group up to
``chunk`` jobs of one model, so small jobs cost a fraction of a broker message each. If publishing
fails, the jobs just recorded are failed as ``broker_unavailable`` (never left queued with no message)
and the caller gets a 503 to retry.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import cast

from api.services import Services
from queueformer.contract.errors import BrokerUnavailable, QuotaExceeded
from queueformer.contract.ids import new_id
from queueformer.contract.jobs import FineTuneJob
from queueformer.contract.tasks import AnyJob, estimate_tokens
from queueformer.contract.units import job_units
from queueformer.server import keys
from queueformer.server.broker import publish

log = logging.getLogger(__name__)


class Enqueuer:
    """Turns validated job specs into records and broker messages."""

    def __init__(self, services: Services, chunk: int = 128) -> None:
        self.s = services
        self.chunk = chunk

    def check_quota(self, tenant: str, tokens: int) -> None:
        current = int(cast(str | None, self.s.redis.get(keys.tenant_tokens(tenant))) or 0)
        cap = self.s.settings.quota.max_enqueued_tokens
        if current + tokens > cap:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {current} tokens enqueued; adding {tokens} would pass the limit of {cap}",
                details={"enqueued_tokens": current, "limit": cap},
            )

    def submit(self, specs: Sequence[AnyJob], tenant: str) -> list[str]:
        registry = self.s.registry()
        queues: dict[str, str] = {}
        tokens: dict[str, int] = {}
        pairs: list[tuple[str, AnyJob]] = []
        default = self.s.tenants.get(tenant).priority
        priorities: dict[str, int] = {}
        for spec in specs:
            entry = registry.get(spec.model, spec.task, tenant=tenant)
            if isinstance(spec, FineTuneJob):
                # The job keeps the reference as given (a file id, never a storage path); the worker checks
                # it again against the job's tenant before it reads a byte.
                self.s.training.check(spec.training_file, tenant)
            job_id = new_id("job")
            queues[job_id] = registry.queue_for(entry, spec.task)
            tokens[job_id] = estimate_tokens(spec)
            priorities[job_id] = default if spec.priority is None else spec.priority
            pairs.append((job_id, spec))
        self.check_quota(tenant, sum(tokens.values()))
        self.s.jobs.create_many(pairs, tenant=tenant, queue=queues, estimate_tokens=tokens, priority=priorities)
        groups: dict[tuple[str, str, str, int], list[str]] = defaultdict(list)
        for job_id, spec in pairs:
            groups[(spec.model, queues[job_id], spec.task, priorities[job_id])].append(job_id)
        self.publish(groups)
        return [job_id for job_id, _ in pairs]

    def publish(self, groups: dict[tuple[str, str, str, int], list[str]]) -> None:
        sent: set[str] = set()
        try:
            with self.s.celery.producer_or_acquire() as producer:
                for unit, queue in job_units(groups, self.chunk):
                    publish(self.s.celery, unit, queue, producer=producer)
                    sent.update(unit.ids)
        except Exception as exc:
            unsent = [i for ids in groups.values() for i in ids if i not in sent]
            err = BrokerUnavailable(f"could not enqueue: {exc}")
            for job_id in unsent:
                try:
                    self.s.jobs.fail(job_id, err.info())
                except Exception:  # the broker and the state store are the same Redis: log and move on
                    log.exception("could not mark unsent job %s failed", job_id)
            raise err from exc
