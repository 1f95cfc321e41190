"""Background threads that keep Redis out of the decode loop.

``CancelWatcher`` polls the cancel flags of everything running on this worker (one pipelined read per
interval) and flips local events that engines check between steps. ``TokenPublisher`` takes tokens the
engine streams and appends them to job event streams in batches.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable

import redis

log = logging.getLogger(__name__)

FlagReader = Callable[[list[str]], set[str]]


class CancelWatcher:
    """Turns cancel flags stored in Redis into in-process ``threading.Event``s."""

    def __init__(self, read_flags: FlagReader, interval_s: float = 0.1) -> None:
        self._read = read_flags
        self._interval = interval_s
        self._events: dict[str, threading.Event] = {}
        self._refs: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cancel-watcher", daemon=True)
        self._thread.start()

    def watch(self, key: str) -> threading.Event:
        """The event for ``key``, already set if its flag is: a cancel that came before the work starts
        stops it before anything runs, not at the next poll."""
        with self._lock:
            self._refs[key] += 1
            event = self._events.setdefault(key, threading.Event())
        if not event.is_set():
            try:
                if key in self._read([key]):
                    event.set()
            except redis.RedisError:
                log.warning("cancel flag of %s unreadable; the next poll reads it", key, exc_info=True)
        return event

    def unwatch(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._refs[key] -= 1
                if self._refs[key] <= 0:
                    del self._refs[key]
                    self._events.pop(key, None)

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                keys = [k for k, ev in self._events.items() if not ev.is_set()]
            if not keys:
                continue
            try:
                flagged = self._read(keys)
            except redis.RedisError:
                log.warning("cancel flags unreadable; will retry", exc_info=True)
                continue
            with self._lock:
                for key in flagged:
                    ev = self._events.get(key)
                    if ev is not None:
                        ev.set()


Publish = Callable[[list[tuple[str, int, str]]], None]


class TokenPublisher:
    """Collects (job id, sequence index, text delta) from engines and publishes them in batches."""

    def __init__(self, publish: Publish) -> None:
        self._publish = publish
        self._q: queue.SimpleQueue[tuple[str, int, str] | threading.Event | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # tokens handed in, and tokens handed to ``publish`` (sent or dropped)
        self._done = 0
        self._thread = threading.Thread(target=self._loop, name="token-publisher", daemon=True)
        self._thread.start()

    def callback(self, job_id: str) -> Callable[[int, int, str], None]:
        def on_token(index: int, _token_id: int, text: str) -> None:
            with self._lock:
                self._queued += 1
            self._q.put((job_id, index, text))

        return on_token

    def flush(self, timeout: float = 5.0) -> None:
        """Return once every token queued before this call is published (or ``timeout`` passes).

        A job's terminal state must not overtake its last tokens: a stream reader stops at that state.
        """
        with self._lock:
            idle = self._queued == self._done
        if idle or not self._thread.is_alive():
            return  # every commit flushes; one with no streamed tokens pending costs no hand-off
        published = threading.Event()
        self._q.put(published)
        published.wait(timeout)

    def flush_and_stop(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            batch: list[tuple[str, int, str]] = []
            flushed: list[threading.Event] = []
            stop = False
            while True:
                if item is None:
                    stop = True
                    break
                if isinstance(item, threading.Event):
                    flushed.append(item)
                else:
                    batch.append(item)
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._send(batch)
            for event in flushed:
                event.set()
            if stop:
                return

    def _send(self, batch: list[tuple[str, int, str]]) -> None:
        try:
            self._publish(batch)
        except redis.RedisError:
            # Tokens are a convenience view; the result in storage is the record. Drop, don't block decode.
            log.warning("could not publish %d streamed tokens", len(batch), exc_info=True)
        finally:
            with self._lock:
                self._done += len(batch)
