"""The one Celery task: validate the envelope, run it, retry only what is transient.

Everything else (handler lookup, batching, commits, error mapping) lives in ``workers.runner``.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery, Task

from queueformer.contract.errors import TransientError
from queueformer.contract.units import RUN_TASK
from workers import metrics
from workers.lease import LeaseKeeper
from workers.runner import Runner

MAX_BACKOFF_S = 60


def register(app: Celery, runner: Runner, lease: LeaseKeeper) -> Task:
    @app.task(name=RUN_TASK, bind=True, shared=False)  # bound to this app's runner only
    def run(self: Task, unit: dict[str, Any]) -> dict[str, Any]:
        # kombu's Redis transport tags each delivery in the message properties (not in delivery_info).
        tag = (getattr(self.request, "properties", None) or {}).get("delivery_tag")
        metrics.IN_FLIGHT.inc()
        try:
            with lease.hold(tag):
                return runner.run(unit)
        except (TransientError, redis.ConnectionError, redis.TimeoutError) as exc:
            # Commits are idempotent, so running the unit again only finishes what is left.
            raise self.retry(exc=exc, countdown=min(MAX_BACKOFF_S, 2**self.request.retries), max_retries=None) from exc
        finally:
            metrics.IN_FLIGHT.dec()

    return run
