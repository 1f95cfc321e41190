"""Runs fine-tune work units: one job at a time, on this worker's device, resumable.

A fine-tune is started like any job (its attempt counted, so a job that kills its worker every time
is quarantined as ``worker_lost``), resumes from its newest checkpoint when redelivered, and commits
its result through the same idempotent finish as every other job. A graceful shutdown checkpoints,
hands the attempt back and re-queues the job.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from redis.exceptions import LockError
from redis.lock import Lock

from queueformer.contract.errors import ErrorInfo, InternalError, QueueformerError, TransientError, WorkerLost
from queueformer.contract.jobs import FineTuneJob
from queueformer.contract.tasks import parse_job
from queueformer.contract.units import JobsUnit
from queueformer.server import keys
from queueformer.server.jobs import JobStore
from queueformer.server.storage import Storage
from workers import metrics
from workers.engine.lane import on_own_thread
from workers.handlers.fine_tune import FineTuneHandler

log = logging.getLogger(__name__)


class TrainingRunner:
    """Owns the fine-tune queue's jobs in this worker process."""

    def __init__(
        self,
        handler: FineTuneHandler,
        jobs: JobStore,
        storage: Storage,
        max_deliveries: int = 3,
        lease_s: float = 3600,
    ) -> None:
        self.handler = handler
        self.lease_s = lease_s
        self.jobs = jobs
        self.storage = storage
        self.max_deliveries = max_deliveries
        self.draining = threading.Event()
        self._device = threading.Lock()  # one training run on the device at a time

    def run(self, unit: JobsUnit) -> dict[str, Any]:
        done = 0
        for job_id in unit.ids:
            done += self.run_one(job_id)
        return {"jobs": done}

    def run_one(self, job_id: str) -> int:
        # The device first: a lease taken while waiting for it would not be renewed and could lapse.
        with self._device:
            # Redelivery can hand the same job to two consumers; a lease in Redis lets only one train it.
            # Taken here, renewed by the training thread's stop checks: the token is not thread-local.
            lease = self.jobs.r.lock(keys.fine_tune_lease(job_id), timeout=self.lease_s, thread_local=False)
            if not lease.acquire(blocking=False):
                # Running elsewhere, or the lease of a dead run has not lapsed yet: try again shortly (the
                # task retries with backoff); once the job is finished, the retry finds nothing to do.
                raise TransientError(f"fine-tune {job_id} holds a lease elsewhere; trying again")
            try:
                return self._train(job_id, lease)
            finally:
                with contextlib.suppress(LockError):
                    lease.release()

    def _train(self, job_id: str, lease: Lock) -> int:
        data = self.jobs.raw(job_id)
        attempt = self.jobs.start_many([job_id])[0]
        if not attempt:
            return 0  # finished or cancelled before this delivery
        outcome: str | ErrorInfo
        started = time.perf_counter()
        try:
            if attempt > self.max_deliveries:
                raise WorkerLost(f"delivered {attempt} times without finishing; quarantined")
            spec = parse_job(data["spec"])
            if not isinstance(spec, FineTuneJob):
                raise InternalError(f"job {job_id} is a {spec.task!r} job on the fine-tune path")
            deadline = float(data["deadline"]) if data.get("deadline") else None
            plan = self.handler.preprocess(job_id, spec, data.get("tenant"), self._stop_reason(job_id, deadline, lease))
            # on a thread that ends with the run: see workers.engine.lane.on_own_thread
            run = on_own_thread(lambda: self.handler.forward(plan), f"fine-tune-{job_id}")
            result = self.handler.postprocess(plan, run)
            outcome = self.storage.put_json(self.storage.result_key(job_id), result.model_dump(mode="json"))
        except TransientError:
            self.jobs.release(job_id)  # not the job's fault: the redelivery does not count against it
            raise
        except QueueformerError as exc:
            outcome = exc.info()
        except Exception as exc:
            log.exception("fine-tune %s failed", job_id)
            outcome = InternalError(f"{type(exc).__name__}: {exc}").info()
        finally:
            metrics.RUN.labels("fine-tune").observe(time.perf_counter() - started)
        self.jobs.finish_many([(job_id, outcome)])
        code = outcome.code if isinstance(outcome, ErrorInfo) else "succeeded"
        metrics.JOBS.labels(data.get("model", ""), "fine-tune", code).inc()
        return 1

    def _stop_reason(self, job_id: str, deadline: float | None, lease: Lock) -> Any:
        renewed = [time.monotonic()]

        def reason() -> str | None:
            if time.monotonic() - renewed[0] > self.lease_s / 3:
                lease.reacquire()  # checked every optimizer step, so the lease outlives only a live run
                renewed[0] = time.monotonic()
            if self.draining.is_set():
                return "draining"
            if deadline is not None and time.time() > deadline:
                return "deadline"
            if self.jobs.cancel_requested([job_id]):
                return "cancelled"
            return None

        return reason
