"""Lease renewal for messages in flight, so long jobs are never redelivered while their worker lives.

kombu's Redis transport keeps each unacknowledged message in a sorted set scored by delivery time and
hands it back to the queue once that score is older than the visibility timeout (celery#5935: long
jobs then run twice). A worker that is alive re-scores the messages it is working on every third of
the timeout, so the timeout never bounds how long a job may run. A dead worker's messages come back
seconds after its heartbeat stops (``queueformer.server.liveness``); the timeout is only the last
resort, for when no API process runs the sweeps.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import redis

from queueformer.server import keys

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Re-scores in-flight delivery tags in kombu's ``unacked_index`` until their task returns."""

    def __init__(
        self,
        client: redis.Redis,
        visibility_timeout_s: float,
        renew_s: float = 0.0,
        index_key: str = keys.UNACKED_INDEX,
    ) -> None:
        self._r = client
        self._key = index_key
        self._renew = renew_s or max(1.0, visibility_timeout_s / 3)
        self._tags: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.renewals = 0
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def hold(self, tag: str | None) -> Iterator[None]:
        if tag is None:
            yield
            return
        with self._lock:
            self._tags.add(tag)
        try:
            yield
        finally:
            with self._lock:
                self._tags.discard(tag)

    def held(self) -> set[str]:
        """The delivery tags this worker's tasks hold now."""
        with self._lock:
            return set(self._tags)

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self._renew):
            with self._lock:
                tags = list(self._tags)
            if not tags:
                continue
            try:
                # XX: only re-score tags still unacked; an acked message must not be resurrected.
                self._r.zadd(self._key, dict.fromkeys(tags, time.time()), xx=True)
                self.renewals += 1
            except redis.RedisError:
                log.warning("could not renew %d message leases", len(tags), exc_info=True)
