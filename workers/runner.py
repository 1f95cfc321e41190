"""Runs one work unit: validate, hand every item to its model's engine, commit each result as it lands.

Commits are idempotent: a job finishes through a compare-and-set on its record, so a redelivered unit
skips what is already done. Errors become ``ErrorInfo`` on the job (with ``code`` and ``retryable``);
only transient trouble (Redis or storage briefly away) propagates, for the task to retry the unit.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from queueformer.contract.errors import (
    DeadlineExceeded,
    ErrorInfo,
    InvalidInput,
    PoisonInput,
    QueueformerError,
    TransientError,
    WorkerLost,
)
from queueformer.contract.jobs import Task
from queueformer.contract.tasks import parse_job
from queueformer.contract.units import JobsUnit, LinesUnit, WorkUnit
from queueformer.server.jobs import JobStore
from queueformer.server.liveness import QUARANTINE_AFTER_ALONE, job_member
from queueformer.server.storage import Storage
from workers import metrics
from workers.engine.item import Tracker, WorkItem
from workers.holder import ModelHolder, Served
from workers.pending import Pending, commit_retry, outcome
from workers.watch import CancelWatcher, TokenPublisher

if TYPE_CHECKING:
    from workers.lines import LineRunner
    from workers.training.runner import TrainingRunner

log = logging.getLogger(__name__)

_UNIT: TypeAdapter[JobsUnit | LinesUnit] = TypeAdapter(WorkUnit)


class Runner:
    """Executes work units against the models in a ``ModelHolder``."""

    def __init__(
        self,
        holder: ModelHolder,
        jobs: JobStore,
        storage: Storage,
        *,
        max_deliveries: int = 20,
        isolate_after_strikes: int = 2,
        tracker: Tracker | None = None,
        watcher: CancelWatcher | None = None,
        tokens: TokenPublisher | None = None,
        lines: LineRunner | None = None,
        training: TrainingRunner | None = None,
    ) -> None:
        self.holder = holder
        self.jobs = jobs
        self.storage = storage
        self.max_deliveries = max_deliveries
        self.isolate_after_strikes = isolate_after_strikes
        self.tracker = tracker
        self.watcher = watcher or CancelWatcher(lambda keys: jobs.cancel_requested(keys))
        self.tokens = tokens or TokenPublisher(jobs.publish_tokens)
        self.lines = lines  # batch chunks; None on a worker that takes no batch lines
        self.training = training  # fine-tunes; only on workers of the fine-tune queue

    def run(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            unit = _UNIT.validate_python(payload)
        except ValidationError as exc:
            # A malformed envelope can never succeed: log and drop it rather than loop on it.
            log.error("dropping malformed work unit: %s", exc)
            return {"dropped": True}
        if isinstance(unit, JobsUnit) and unit.task == Task.FINE_TUNE:
            if self.training is None:
                raise InvalidInput("this worker does not run fine-tunes")
            trained: dict[str, Any] = self.training.run(unit)
            return trained
        try:
            served = self.holder.get(unit.model)
        except QueueformerError as exc:
            if isinstance(exc, TransientError) or not isinstance(unit, JobsUnit):
                raise
            # The model cannot be had here (e.g. a fine-tuned model whose files are gone): end its jobs.
            self._fail_all(unit, exc.info())
            return {"jobs": 0, "failed": len(unit.ids)}
        if isinstance(unit, JobsUnit):
            return self.run_jobs(served, unit)
        if self.lines is None:
            raise InvalidInput("this worker does not process batch lines")
        result: dict[str, Any] = self.lines.run(served, unit)
        return result

    # --- single jobs -------------------------------------------------------------------------------

    @commit_retry
    def _fail_all(self, unit: JobsUnit, error: ErrorInfo) -> None:
        started = [j for j, a in zip(unit.ids, self.jobs.start_many(unit.ids), strict=True) if a]
        self.jobs.finish_many([(job_id, error) for job_id in started])

    def run_jobs(self, served: Served, unit: JobsUnit) -> dict[str, Any]:
        """Start every job of the unit, feed the engine, and commit results in batches as they land.

        Redis work is batched: one round trip reads the records, one starts them, and finished jobs are
        recorded a group at a time (whenever the next result is not ready yet, or every 64).
        """
        records = self.jobs.raw_many(unit.ids)
        attempts = self.jobs.start_many(unit.ids)
        done: list[tuple[str, BaseModel | ErrorInfo]] = []
        pending: list[Pending] = []
        for job_id, data, attempt in zip(unit.ids, records, attempts, strict=True):
            if not attempt:
                continue  # gone, or already finished by an earlier delivery
            admitted = self._admit_job(served, job_id, data, attempt, unit.priority)
            if isinstance(admitted, Pending):
                pending.append(admitted)
            else:
                done.append((job_id, admitted))
        try:
            for p in pending:
                if done and not p.item.future.done():
                    self._commit(served, done)  # don't hold finished jobs back while this one runs
                    done = []
                result = outcome(served, p)
                if isinstance(result, TransientError):
                    raise result  # not the job's fault: the unit runs again and skips what is committed
                done.append((p.key, result.info() if isinstance(result, QueueformerError) else result))
                if len(done) >= 64:
                    self._commit(served, done)
                    done = []
            self._commit(served, done)
        finally:
            self.watcher.unwatch(p.key for p in pending)
        return {"jobs": len(pending), "skipped": len(unit.ids) - len(pending)}

    def _admit_job(
        self, served: Served, job_id: str, data: dict[str, str], attempt: int, priority: int
    ) -> Pending | ErrorInfo:
        """Hand a started job to the engine, or the error that ends it now."""
        # Strikes are worker deaths while this job was executing (queueformer.server.liveness).
        strikes, alone = int(data.get("strikes") or 0), int(data.get("strikes_alone") or 0)
        if alone >= QUARANTINE_AFTER_ALONE:
            return PoisonInput(
                f"this job killed its worker when it ran alone, {alone} times (after {strikes - alone} deaths of "
                "workers running it in a batch); quarantined"
            ).info()
        if attempt > self.max_deliveries:
            return WorkerLost(f"delivered {attempt} times without finishing; quarantined").info()
        metrics.WAIT.labels(served.entry.name, "job").observe(max(0.0, time.time() - float(data["created_at"])))
        deadline = float(data["deadline"]) if data.get("deadline") else None
        if deadline is not None and time.time() > deadline:
            return DeadlineExceeded("the job's deadline passed before it started").info()
        try:
            spec = parse_job(data["spec"])
            prepared = served.handler.preprocess(spec)
        except QueueformerError as exc:
            return exc.info()
        except ValidationError as exc:
            return InvalidInput(str(exc)).info()
        flag = self.watcher.watch(job_id)
        item = WorkItem(
            prepared,
            cancelled=flag.is_set,
            deadline=time.monotonic() + (deadline - time.time()) if deadline is not None else None,
            on_token=self.tokens.callback(job_id) if getattr(spec, "stream", False) else None,
            priority=priority,
            key=job_member(job_id),
            alone=strikes >= self.isolate_after_strikes,
            tracker=self.tracker,
        )
        served.engine.submit(item)
        return Pending(job_id, prepared, item, time.perf_counter())

    @commit_retry
    def _commit(self, served: Served, done: list[tuple[str, BaseModel | ErrorInfo]]) -> None:
        """Results to storage first, then every record in one round trip: no job succeeds without its result."""
        if not done:
            return
        keys = {job_id: self.storage.result_key(job_id) for job_id, r in done if not isinstance(r, ErrorInfo)}
        uris = self.storage.put_json_many(
            {keys[job_id]: r.model_dump(mode="json") for job_id, r in done if not isinstance(r, ErrorInfo)}
        )
        outcomes: list[tuple[str, str | ErrorInfo]] = [
            (job_id, r if isinstance(r, ErrorInfo) else uris[keys[job_id]]) for job_id, r in done
        ]
        task = served.entry.task.value
        self.tokens.flush()  # streamed tokens land before the terminal state that ends a reader's stream
        generated = 0
        for (_, result), (_, ended), changed in zip(done, outcomes, self.jobs.finish_many(outcomes), strict=True):
            if changed:
                code = ended.code if isinstance(ended, ErrorInfo) else "succeeded"
                metrics.JOBS.labels(served.entry.name, task, code).inc()
                usage = getattr(result, "usage", None)
                generated += usage.completion_tokens if usage is not None else 0
        self.jobs.count_generated(served.entry.name, generated)

    def stop(self) -> None:
        self.watcher.stop()
        self.tokens.flush_and_stop()
