"""What this worker holds, recorded in Redis so that its death costs seconds and blames the right lines.

``took`` records each delivery tag as Celery receives the message (prefetched ones included); the
engines call ``begin`` right before they execute items, and an item leaves the executing record when
its future resolves. Recording *before* execution matters: an input that kills the worker at once must
already be on record, or it would crash worker after worker without ever taking a strike. Removals
are written by a background thread (a stale member at death costs at most one needless strike); the
write-ahead ``begin`` is the only Redis call an engine makes, once per admitted group.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import redis

from queueformer.server.liveness import ALONE, Custody
from workers.engine.item import WorkItem

log = logging.getLogger(__name__)


class CustodyTracker:
    """The worker's delivery and executing records (see ``queueformer.server.liveness``)."""

    def __init__(self, custody: Custody, flush_s: float = 0.2) -> None:
        self.custody = custody
        self._ended: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._flush_s = flush_s
        self._thread = threading.Thread(target=self._loop, name="custody", daemon=True)
        self._thread.start()

    def took(self, tag: str | None) -> None:
        if tag is None:
            return
        try:
            self.custody.took(tag)
        except redis.RedisError:
            # Unclaimed, the message is handed back only after the orphan delay if this worker dies.
            log.warning("could not record delivery %s", tag, exc_info=True)

    def begin(self, items: Sequence[WorkItem]) -> None:
        members = [member(it) for it in items]
        try:
            self.custody.begin(members)
        except redis.RedisError:
            log.warning("could not record %d executing items", len(members), exc_info=True)
        for it, m in zip(items, members, strict=True):
            it.future.add_done_callback(self._on_end(m))

    def _on_end(self, m: str) -> Callable[[Future[Any]], None]:
        return lambda _f: self._ended.put(m)

    def stop(self) -> None:
        """Flush what ended, then forget the record: a clean exit leaves nothing to strike."""
        self._ended.put(None)
        self._thread.join(timeout=10)
        try:
            self.custody.clear()
        except redis.RedisError:
            log.warning("could not clear the executing record", exc_info=True)

    def _loop(self) -> None:
        while True:
            first = self._ended.get()
            batch = [] if first is None else [first]
            stop = first is None
            while not stop:
                try:
                    nxt = self._ended.get(timeout=self._flush_s) if not batch else self._ended.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                else:
                    batch.append(nxt)
            if batch:
                try:
                    self.custody.end(batch)
                except redis.RedisError:
                    log.warning("could not update the executing record", exc_info=True)
            if stop:
                return


def member(item: WorkItem) -> str:
    assert item.key is not None
    return item.key + (ALONE if item.alone else "")
