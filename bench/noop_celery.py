"""Raw Celery for the queue-overhead baseline: one message per job, a no-op task that counts itself.

Same broker settings as queueformer's own app (JSON, late acks, prefetch 1, threads pool), so the
comparison is about how work is packed into messages, not about tuning.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

from queueformer.contract.settings import load_settings
from queueformer.server.broker import celery_config

URL = os.environ.get("QUEUEFORMER_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("bench-noop", broker=URL, set_as_current=False)
app.conf.update(celery_config(load_settings(redis_url=URL)))
app.conf.task_default_queue = "bench-noop"
_counter = redis.Redis.from_url(URL)


@app.task(name="bench.noop")
def noop(_i: int) -> None:
    _counter.incr("bench:noop:done")
