"""Dynamic batching by length bucket for one-shot tasks (fill-mask, classify, translate, echo).

One thread owns the model. Items from every task thread land in one inbox; the thread takes what is
waiting, groups it by the handler's ``group_key``, sorts each group by length and cuts it into batches
bounded by ``max_batch_size`` and ``max_batch_tokens`` (padded), so short inputs are not padded to long
ones. An out-of-memory batch is split in halves until the item that cannot fit fails alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence

import torch

from queueformer.contract.errors import OutOfMemory, TransientError
from workers.engine.device import free_memory, is_oom
from workers.engine.item import WorkItem
from workers.handlers.base import Handler

log = logging.getLogger(__name__)

BatchObserver = Callable[[str, int, int, float], None]  # (model, items, tokens, seconds)


class BatchEngine:
    """Runs ``handler.forward`` on batches assembled from everything submitted."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        gather_s: float = 0.002,
        observer: BatchObserver | None = None,
    ) -> None:
        self.handler = handler
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.gather_s = gather_s
        self.observer = observer
        self._inbox: queue.SimpleQueue[WorkItem | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"engine-{handler.entry.name}", daemon=True)
        self._stopping = False
        self.fatal: BaseException | None = None
        self._thread.start()

    def submit(self, item: WorkItem) -> WorkItem:
        self._inbox.put(item)
        return item

    def stop(self) -> None:
        """Stop the loop; anything still queued fails as transient, so its message is run again elsewhere."""
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout=30)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item.reject(TransientError(f"the {self.handler.entry.name} engine stopped before this ran"))

    # --- the engine thread ----------------------------------------------------------------------

    def _take(self) -> list[WorkItem]:
        first = self._inbox.get()
        if first is None:
            return []
        items = [first]
        deadline = time.monotonic() + self.gather_s
        # Wait a moment for the rest of a burst: task threads submit their items one by one.
        while len(items) < 16 * self.max_batch_size:
            timeout = deadline - time.monotonic()
            try:
                nxt = self._inbox.get(timeout=max(0.0, timeout)) if timeout > 0 else self._inbox.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._stopping = True
                break
            items.append(nxt)
        return items

    def _loop(self) -> None:
        while not self._stopping:
            items = self._take()
            if not items:
                continue
            try:
                for batch in self.plan(items):
                    self._run(batch)
            except BaseException as exc:  # a bug here must not strand the waiting task threads
                log.exception("engine %s failed", self.handler.entry.name)
                self.fatal = exc
                for it in items:
                    it.reject(exc)

    def plan(self, items: Sequence[WorkItem]) -> list[list[WorkItem]]:
        """Group, sort by size and cut into batches that respect both caps."""
        groups: dict[Hashable, list[WorkItem]] = defaultdict(list)
        for it in items:
            reason = it.stop_reason()
            if reason is not None:
                it.reject(reason)
                continue
            groups[self.handler.group_key(it.prepared)].append(it)
        batches: list[list[WorkItem]] = []
        for group in groups.values():
            group.sort(key=lambda it: self.handler.size(it.prepared))
            current: list[WorkItem] = []
            shortest = 0
            for it in group:
                width = self.handler.size(it.prepared)
                # sorted ascending, so the newest item is the widest: padded cost = count x width. A batch
                # also ends where padding would pass ~25%: padded rows cost more than they save on a CPU.
                if current and (
                    len(current) >= self.max_batch_size
                    or (len(current) + 1) * width > self.max_batch_tokens
                    or width > shortest * 1.25 + 4
                ):
                    batches.append(current)
                    current = []
                if not current:
                    shortest = width
                current.append(it)
            if current:
                batches.append(current)
        # The most urgent batch first (a stable sort: arrival order within a priority).
        batches.sort(key=lambda batch: -max(it.priority for it in batch))
        return batches

    def _run(self, batch: list[WorkItem]) -> None:
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                outputs = self.handler.forward([it.prepared for it in batch])
        except Exception as exc:
            if is_oom(exc):
                free_memory()
                if len(batch) == 1:
                    batch[0].reject(OutOfMemory(f"out of memory running this input alone on {self.handler.entry.name}"))
                    return
                log.warning("OOM on a batch of %d; splitting it", len(batch))
                half = len(batch) // 2
                self._run(batch[:half])
                self._run(batch[half:])
                return
            if len(batch) > 1:
                # One bad input must not fail its neighbours: run them one by one to find it.
                for it in batch:
                    self._run([it])
                return
            batch[0].reject(exc)
            return
        for it, out in zip(batch, outputs, strict=True):
            it.resolve(out)
        if self.observer is not None:
            tokens = sum(self.handler.size(it.prepared) for it in batch)
            self.observer(self.handler.entry.name, len(batch), tokens, time.perf_counter() - started)
