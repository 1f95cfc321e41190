"""Dynamic batching by length bucket for one-shot tasks (fill-mask, classify, translate, echo).

The worker's lane (``workers.engine.lane``) runs this engine's turns. Items from every task thread land
in one inbox; a turn takes what is waiting, groups it by the handler's ``group_key``, sorts each group
by length and cuts it into batches bounded by ``max_batch_size`` and ``max_batch_tokens`` (padded), so
short inputs are not padded to long ones; each later turn runs one of those batches. An out-of-memory
batch is split in halves until the item that cannot fit fails alone.
"""

from __future__ import annotations

import collections
import logging
import queue
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence

import torch

from queueformer.contract.errors import OutOfMemory, TransientError
from workers.engine.device import free_memory, is_oom
from workers.engine.item import WorkItem, begin
from workers.engine.lane import Lane
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
        lane: Lane | None = None,
    ) -> None:
        self.handler = handler
        self.name = handler.entry.name
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.gather_s = gather_s
        self.observer = observer
        self._inbox: queue.SimpleQueue[WorkItem] = queue.SimpleQueue()
        self._planned: collections.deque[list[WorkItem]] = collections.deque()
        self._stopping = False
        self.fatal: BaseException | None = None
        # The worker's lane runs this engine's batches with its other engines' turns; alone, it gets its own.
        self._own_lane = lane is None
        self.lane = lane if lane is not None else Lane(f"engine-{self.name}")
        self.lane.add(self)

    def submit(self, item: WorkItem) -> WorkItem:
        self._inbox.put(item)
        self.lane.wake()
        return item

    def stop(self) -> None:
        """Leave the lane; anything still queued fails as transient, so its message is run again elsewhere."""
        self._stopping = True
        self.lane.remove(self)
        if self._own_lane:
            self.lane.stop()
        pending = [it for batch in self._planned for it in batch]
        self._planned.clear()
        while True:
            try:
                pending.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in pending:
            item.reject(TransientError(f"the {self.name} engine stopped before this ran"))

    # --- on the lane's thread -------------------------------------------------------------------

    def ready(self) -> bool:
        return not self._stopping and bool(self._planned or not self._inbox.empty())

    def turn(self) -> None:
        """Run the most urgent planned batch, planning what was submitted first when nothing is planned."""
        if not self._planned:
            self._planned.extend(self.plan(self._take()))
        if not self._planned:
            return
        batch = self._planned.popleft()
        try:
            self._run(batch)
        except BaseException as exc:  # a bug here must not strand the waiting task threads
            log.exception("engine %s failed", self.name)
            self.fatal = exc
            for it in [*batch, *(it for b in self._planned for it in b)]:
                it.reject(exc)
            self._planned.clear()

    def _take(self) -> list[WorkItem]:
        items: list[WorkItem] = []
        deadline = time.monotonic() + self.gather_s
        # Wait a moment for the rest of a burst: task threads submit their items one by one.
        while len(items) < 16 * self.max_batch_size:
            timeout = deadline - time.monotonic()
            try:
                items.append(self._inbox.get(timeout=timeout) if items and timeout > 0 else self._inbox.get_nowait())
            except queue.Empty:
                break
        return items

    def plan(self, items: Sequence[WorkItem]) -> list[list[WorkItem]]:
        """Group, sort by size and cut into batches that respect both caps."""
        groups: dict[Hashable, list[WorkItem]] = defaultdict(list)
        for it in items:
            reason = it.stop_reason()
            if reason is not None:
                it.reject(reason)
                continue
            groups[self.handler.group_key(it.prepared)].append(it)
        # Suspects of earlier crashes run alone, so a crash while one runs names it.
        batches: list[list[WorkItem]] = [[it] for g in groups.values() for it in g if it.alone]
        for group in groups.values():
            group = [it for it in group if not it.alone]
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
        begin(batch)
        try:
            with torch.inference_mode():
                outputs = self.handler.forward([it.prepared for it in batch])
        except Exception as exc:
            if is_oom(exc):
                free_memory()
                if len(batch) == 1:
                    batch[0].reject(OutOfMemory(f"out of memory running this input alone on {self.name}"))
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
            self.observer(self.name, len(batch), tokens, time.perf_counter() - started)
