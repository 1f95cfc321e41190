"""The one Celery task: validate the envelope, run it, retry only what is transient.

Everything else (handler lookup, batching, commits, error mapping) lives in ``workers.runner``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import Reject

from queueformer.contract.errors import TransientError
from queueformer.contract.units import RUN_TASK
from workers import metrics
from workers.lease import LeaseKeeper
from workers.runner import Runner

MAX_BACKOFF_S = 60
LINE_SLOT_WAIT_S = 0.5
REQUEUED = "every slot for batch lines is busy; the chunk goes back to its queue"


class _QuietRequeue(logging.Filter):
    """Celery logs every rejected message as a warning with a traceback; a requeued chunk is routine here
    (about one a second on a worker running a long batch), so it is left out of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return REQUEUED not in record.getMessage()


def register(app: Celery, runner: Runner, lease: LeaseKeeper, line_slots: int | None = None) -> Task:
    """The task, with at most ``line_slots`` consumer slots running batch chunks at once.

    A chunk holds its slot until its last line is committed, so a batch could hold every slot and a job
    sent behind it would wait in the broker for a whole chunk, whatever its priority. With a slot kept
    back, a chunk that finds the others busy waits ``LINE_SLOT_WAIT_S`` for one and otherwise goes back
    to the end of its queue (the same priority list); the kept slot takes the most urgent message next.
    """
    gate = threading.BoundedSemaphore(line_slots) if line_slots else None
    if gate is not None:
        logging.getLogger("celery.app.trace").addFilter(_QuietRequeue())

    @app.task(name=RUN_TASK, bind=True, shared=False)  # bound to this app's runner only
    def run(self: Task, unit: dict[str, Any]) -> dict[str, Any]:
        # kombu's Redis transport tags each delivery in the message properties (not in delivery_info).
        tag = (getattr(self.request, "properties", None) or {}).get("delivery_tag")
        # Held from here, the wait for a slot included: what this worker holds is not handed back when its
        # broker connection returns (``workers.reconnect``), and its lease is renewed.
        with lease.hold(tag):
            held = gate if gate is not None and isinstance(unit, dict) and unit.get("kind") == "lines" else None
            if held is not None and not held.acquire(timeout=LINE_SLOT_WAIT_S):
                raise Reject(REQUEUED, requeue=True)
            metrics.IN_FLIGHT.inc()
            try:
                return runner.run(unit)
            except (TransientError, redis.ConnectionError, redis.TimeoutError) as exc:
                # Commits are idempotent, so running the unit again only finishes what is left.
                countdown = min(MAX_BACKOFF_S, 2**self.request.retries)
                raise self.retry(exc=exc, countdown=countdown, max_retries=None) from exc
            finally:
                metrics.IN_FLIGHT.dec()
                if held is not None:
                    held.release()

    return run
