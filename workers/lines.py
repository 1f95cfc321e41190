"""Runs a chunk of batch lines: read the byte range, skip what is committed, feed the engine, commit.

Each line is committed exactly once through the batch ledger, so a redelivered chunk only runs the lines
a dead worker left behind. Worker deaths are judged by strikes, given only to lines that were executing
when their worker died (``queueformer.server.liveness``): a line struck ``isolate_after_strikes`` times
runs alone, and one that kills its worker running alone ``QUARANTINE_AFTER_ALONE`` times is quarantined
as ``poison_input`` instead of killing worker after worker (celery#1628, OasisPlatform#975). Lines that
merely waited behind a crash are never quarantined; ``max_deliveries`` is only a backstop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from queueformer.contract.errors import (
    ErrorInfo,
    NotFound,
    PoisonInput,
    QueueformerError,
    TransientError,
    WorkerLost,
)
from queueformer.contract.openai_batch import (
    LineError,
    error_line,
    error_line_for,
    output_line,
    parse_line,
    response_body,
)
from queueformer.contract.units import LinesUnit
from queueformer.server.batch_input import custom_id_of, iter_range
from queueformer.server.batches import Batches
from queueformer.server.ledger import Entry
from queueformer.server.liveness import QUARANTINE_AFTER_ALONE, line_member
from queueformer.server.storage import Storage
from workers import metrics
from workers.engine.item import Tracker, WorkItem
from workers.holder import Served
from workers.pending import Pending, commit_retry, outcome
from workers.watch import CancelWatcher

log = logging.getLogger(__name__)

COMMIT_EVERY = 16
IDLE_GAP_S = 1.0  # a pause longer than this between chunks of a model is idle time, not work


@dataclass
class _Line:
    index: int
    custom_id: str
    pending: Pending
    body: dict[str, Any]  # the request, for what shapes its answer (echo)


class LineRunner:
    """Runs batch chunks for a ``Runner``: the lines of one byte range, committed through the ledger."""

    def __init__(
        self,
        batches: Batches,
        storage: Storage,
        watcher: CancelWatcher,
        max_deliveries: int,
        *,
        isolate_after_strikes: int = 2,
        tracker: Tracker | None = None,
    ) -> None:
        self.batches = batches
        self.storage = storage
        self.watcher = watcher
        self.max_deliveries = max_deliveries
        self.isolate_after_strikes = isolate_after_strikes
        self.tracker = tracker
        self.throughput = Throughput()

    def run(self, served: Served, unit: LinesUnit) -> dict[str, Any]:
        started = self.throughput.clock()
        try:
            raw = self.batches.raw(unit.batch)
        except NotFound:
            log.warning("batch %s is gone; dropping chunk %d", unit.batch, unit.chunk)
            return {"dropped": True}
        status = raw.get("status")
        if status != "in_progress":
            # cancelling/finalizing: whoever started that closes the remaining lines; finished: nothing to do.
            if status == "cancelling":
                self.batches.maybe_finalize(unit.batch)
            return {"skipped": status}
        if self.batches.maybe_expire(unit.batch, raw):
            return {"expired": True}

        data = self.storage.read_range(self.storage.file_key(raw["input_file_id"]), unit.start, unit.end)
        only = set(unit.only) if unit.only is not None else None
        rows = [(i, line) for i, line in iter_range(data, unit.first) if only is None or i in only]
        done = self.batches.ledger.committed(unit.batch, [i for i, _ in rows])
        rows = [(i, line) for i, line in rows if i not in done]
        if not rows:
            self.batches.maybe_finalize(unit.batch)
            return {"lines": 0}
        deliveries = self.batches.ledger.bump_deliveries(unit.batch, [i for i, _ in rows])

        flag = self.watcher.watch(unit.batch)
        try:
            deadline = time.monotonic() + (int(raw["expires_at"]) - time.time())
            immediate, lines = self._submit(served, unit, raw["endpoint"], rows, deliveries, flag.is_set, deadline)
            waited = max(0.0, time.time() - float(raw["created_at"]))
            for _ in lines:
                metrics.WAIT.labels(served.entry.name, "batch_line").observe(waited)
            remaining = self._commit(unit.batch, immediate, served.entry.name)
            pending: list[Entry] = []
            for ln in lines:
                pending.append(self._entry(served, raw["endpoint"], ln))
                if len(pending) >= COMMIT_EVERY:
                    remaining = self._commit(unit.batch, pending, served.entry.name)
                    pending = []
            if pending:
                remaining = self._commit(unit.batch, pending, served.entry.name)
        finally:
            self.watcher.unwatch([unit.batch])
        self.throughput.add(served.entry.name, len(lines), started)
        if not remaining:
            self.batches.maybe_finalize(unit.batch)
        return {"lines": len(rows), "ran": len(lines)}

    @commit_retry
    def _commit(self, batch_id: str, entries: list[Entry], model: str) -> int | None:
        remaining = self.batches.ledger.commit_many(batch_id, entries, model)
        for outcome_ in ("out", "err"):
            count = sum(1 for e in entries if e[1] == outcome_)
            if count:
                metrics.LINES.labels(model, "completed" if outcome_ == "out" else "failed").inc(count)
        return remaining

    def _submit(
        self,
        served: Served,
        unit: LinesUnit,
        endpoint: str,
        rows: list[tuple[int, bytes]],
        deliveries: list[int],
        cancelled: Callable[[], bool],
        deadline: float,
    ) -> tuple[list[Entry], list[_Line]]:
        """Hand every runnable line to the engine; lines that cannot run become error entries at once."""
        immediate: list[Entry] = []
        lines: list[_Line] = []
        strikes = self.batches.ledger.strikes(unit.batch, [i for i, _ in rows])
        for (index, line), tries, (struck, alone) in zip(rows, deliveries, strikes, strict=True):
            err: QueueformerError | None = None
            if alone >= QUARANTINE_AFTER_ALONE:
                err = PoisonInput(
                    f"this request killed its worker when it ran alone, {alone} times (after {struck - alone} "
                    "deaths of workers running it in a batch); quarantined"
                )
            elif tries > self.max_deliveries:
                err = WorkerLost(f"handed to a worker {tries} times without finishing; quarantined")
            if err is not None:
                immediate.append((index, "err", error_line_for(custom_id_of(line) or f"line-{index + 1}", err), 0, 0))
                continue
            try:
                parsed, job = parse_line(line, endpoint)
                if job.model != unit.model:
                    msg = f"line is for {job.model!r}, chunk for {unit.model!r}"
                    raise LineError("model_mismatch", msg, parsed.custom_id, "body.model")
                prepared = served.handler.preprocess(job)
            except LineError as exc:
                info = ErrorInfo(code=exc.code, message=exc.message, param=exc.param)
                immediate.append((index, "err", error_line(exc.custom_id or f"line-{index + 1}", info, 400), 0, 0))
                continue
            except QueueformerError as exc:
                immediate.append((index, "err", error_line_for(parsed.custom_id, exc), 0, 0))
                continue
            item = served.engine.submit(
                WorkItem(
                    prepared,
                    cancelled=cancelled,
                    deadline=deadline,
                    priority=unit.priority,
                    key=line_member(unit.batch, index),
                    alone=struck >= self.isolate_after_strikes,
                    tracker=self.tracker,
                )
            )
            pending = Pending(parsed.custom_id, prepared, item, time.perf_counter())
            lines.append(_Line(index, parsed.custom_id, pending, parsed.body))
        return immediate, lines

    def _entry(self, served: Served, endpoint: str, ln: _Line) -> Entry:
        result = outcome(served, ln.pending)
        task = served.entry.task.value
        if isinstance(result, TransientError):
            raise result  # the chunk runs again; committed lines are skipped
        if isinstance(result, QueueformerError):
            metrics.JOBS.labels(served.entry.name, task, result.code).inc()
            return (ln.index, "err", error_line_for(ln.custom_id, result), 0, 0)
        metrics.JOBS.labels(served.entry.name, task, "succeeded").inc()
        usage = getattr(result, "usage", None)
        tin, tout = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        return (
            ln.index,
            "out",
            output_line(ln.custom_id, 200, response_body(endpoint, result, served.entry.name, ln.body)),
            tin,
            tout,
        )


class Throughput:
    """Lines per second per model while busy, smoothed; workers announce it so the API can size chunks.

    A window of at least 5 s counts the lines of chunks that finished in it. Idle time is not work: a
    chunk that started more than ``IDLE_GAP_S`` after the model's last chunk finished (the worker had
    nothing to do for that model in between) starts a new window at its own start, so a pause between
    batches does not read as a slow worker and shrink the next batch's chunks. Chunks that follow each
    other at once (one slot taking the next message) stay in one window.
    """

    def __init__(self, alpha: float = 0.3, clock: Callable[[], float] = time.monotonic) -> None:
        self.alpha = alpha
        self.clock = clock  # the clock ``started`` was read from
        self.rates: dict[str, float] = {}
        self._window: dict[str, tuple[float, int]] = {}
        self._last: dict[str, float] = {}  # when the model's last chunk finished

    def add(self, model: str, lines: int, started: float) -> None:
        """Count ``lines`` of a chunk that ran from ``started`` (read from ``clock``) until now."""
        now = self.clock()
        last = self._last.get(model)
        self._last[model] = now
        start, count = self._window.get(model, (started, 0))
        if last is not None and started - last > IDLE_GAP_S:
            start, count = started, 0  # idle since ``last``: that gap is not part of the rate
        count += lines
        if now - start >= 5.0:
            rate = count / (now - start)
            old = self.rates.get(model)
            self.rates[model] = rate if old is None else self.alpha * rate + (1 - self.alpha) * old
            self._window[model] = (now, 0)
        else:
            self._window[model] = (start, count)
