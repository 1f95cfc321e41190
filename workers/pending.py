"""An item handed to an engine, how its outcome is read, and how commits ride out short outages."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import BaseModel
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from queueformer.contract.errors import InternalError, QueueformerError, TransientError
from workers import metrics
from workers.engine.item import WorkItem
from workers.holder import Served

log = logging.getLogger(__name__)

# Storage and Redis outages during a commit are waited out in place (a Redis restart takes seconds),
# so finished work is recorded rather than recomputed; past two minutes the unit is retried instead.
commit_retry = retry(
    retry=retry_if_exception_type((TransientError, redis.ConnectionError, redis.TimeoutError)),
    wait=wait_exponential(multiplier=0.2, max=10),
    stop=stop_after_delay(120),
    reraise=True,
)


@dataclass
class Pending:
    """An item handed to an engine, with what its commit needs."""

    key: str
    prepared: Any
    item: WorkItem
    started: float


def outcome(served: Served, p: Pending) -> BaseModel | QueueformerError:
    """Wait for an item and turn it into a result, or the error it ended with."""
    try:
        # Engines fail every pending future if they die, so this cannot hang.
        raw = p.item.future.result()
        result = served.handler.postprocess(p.prepared, raw)
    except QueueformerError as exc:
        return exc
    except Exception as exc:
        log.exception("item %s failed", p.key)
        return InternalError(f"{type(exc).__name__}: {exc}")
    finally:
        metrics.RUN.labels(served.entry.name).observe(time.perf_counter() - p.started)
        if p.item.first_token_at is not None:
            metrics.FIRST_TOKEN.labels(served.entry.name).observe(p.item.first_token_at - p.item.submitted_at)
    return result
