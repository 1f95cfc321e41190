"""Message leases: a job that runs past the broker's visibility timeout is not delivered a second time.

kombu's Redis transport re-queues unacknowledged messages older than the visibility timeout
(celery#5935); the worker's lease keeper re-scores the messages it is working on. This runs a real
Celery worker (threads pool) on a real Redis with a 10 s timeout and a unit that takes 15 s.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from celery.contrib.testing.worker import start_worker

from queueformer.contract.registry import Registry
from queueformer.contract.units import JobsUnit
from queueformer.server.broker import make_celery, publish
from queueformer.server.connection import connect
from tests.helpers import eventually, make_settings
from workers.lease import LeaseKeeper
from workers.tasks import register


class SlowRunner:
    """Stands in for the model runner: the lease around it is what is under test."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0
        self._lock = threading.Lock()

    def run(self, unit: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
        time.sleep(self.seconds)
        return {}


def test_a_unit_longer_than_the_visibility_timeout_is_delivered_once(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url, tmp_path, visibility_timeout_s=10)
    app = make_celery(settings, Registry.load("tiny"))
    lease = LeaseKeeper(connect(redis_url), settings.visibility_timeout_s, renew_s=1)
    runner = SlowRunner(15)
    register(app, runner, lease)  # type: ignore[arg-type]
    try:
        with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False, queues=["echo"]):
            publish(app, JobsUnit(model="echo", ids=["job-leasetest01"]), "echo")
            eventually(lambda: runner.calls >= 1, timeout=15)
            time.sleep(16)  # past the timeout and the transport's restore interval
        assert runner.calls == 1
        assert lease.renewals >= 5
    finally:
        lease.stop()
