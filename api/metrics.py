"""Prometheus metrics: the cluster's one view, at the API's ``/metrics``.

The API process's own figures (requests, queue depths, live workers, resends, webhooks), the cluster's
batches by status read from Redis at scrape time, and every live worker's samples (queue wait, time to
first token, tokens/s, batch occupancy, KV-cache use, model, process and accelerator memory, lines
done), which workers publish to Redis (``workers.metrics.MetricsPublisher``) and which appear here with
a ``worker`` label. One scrape target answers for the whole cluster; sum over ``worker`` for totals.
Every API replica answers the same cluster series (with its own process figures): scrape one replica,
or aggregate with ``max by (worker, ...)`` across replicas.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.history import queue_depths
from queueformer.server import keys

if TYPE_CHECKING:
    from api.services import Services

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)

REQUESTS = Counter(
    "queueformer_api_requests_total",
    "HTTP requests by route and status.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "queueformer_api_request_seconds",
    "HTTP request latency by route.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge("queueformer_queue_depth", "Messages waiting in each model queue.", ["queue"], registry=REGISTRY)
RESENT = Counter(
    "queueformer_resent_total",
    "Jobs and batch chunks sent again because no broker message held them.",
    ["kind"],
    registry=REGISTRY,
)
WEBHOOK_DELIVERIES = Counter(
    "queueformer_webhook_deliveries_total",
    "Batch webhook attempts by outcome: delivered, retrying (failed, tried again later), failed (dropped after its "
    "last attempt), refused (an address the egress policy refuses; never sent).",
    ["outcome"],
    registry=REGISTRY,
)
WEBHOOKS_PENDING = Gauge(
    "queueformer_webhooks_pending", "Batch webhook events waiting for an attempt or in one.", registry=REGISTRY
)
WORKERS = Gauge("queueformer_live_workers", "Workers announcing themselves per model.", ["model"], registry=REGISTRY)


def refresh_queue_depths(services: Services) -> None:
    """Read queue lengths (kombu keeps a Redis list per queue) at scrape time."""
    for q, depth in queue_depths(services.redis, services.registry().queues()).items():
        QUEUE_DEPTH.labels(q).set(depth)
    WEBHOOKS_PENDING.set(services.webhooks.queue.pending())
    for model, workers in services.fleet.by_model().items():
        WORKERS.labels(model).set(len(workers))


class ClusterMetrics(Collector):
    """Scrape-time figures read from Redis: every live worker's samples and the batches by status."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def describe(self) -> list[Metric]:
        return []  # families depend on what workers publish: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._workers()
            yield from self._batches()
        except redis.RedisError as exc:  # /metrics still answers the API's own figures
            log.warning("cluster metrics skipped: Redis is away (%s)", exc)

    def _workers(self) -> Iterator[Metric]:
        names = sorted(cast(list[str], list(self.r.scan_iter(match=keys.WORKER_METRICS_PATTERN, count=1000))))
        if not names:
            return
        prefix = keys.worker_metrics("")
        merged: dict[str, Metric] = {}
        for name, raw in zip(names, cast(list[str | None], self.r.mget(names)), strict=True):
            if raw is None:
                continue  # expired between the scan and the read
            worker = name[len(prefix) :]
            for family_name, kind, doc, samples in cast(list[list[Any]], json.loads(raw)):
                family = merged.get(family_name)
                if family is None:
                    family = merged[family_name] = Metric(family_name, doc, kind)
                for sample, labels, value in samples:
                    family.add_sample(sample, {**labels, "worker": worker}, float(value))
        yield from merged.values()

    def _batches(self) -> Iterator[Metric]:
        open_ids = sorted(cast(set[str], self.r.smembers(keys.OPEN_BATCHES)))
        p = self.r.pipeline(transaction=False)
        for batch_id in open_ids:
            p.hmget(keys.batch(batch_id), ["status", "total", "completed", "failed"])
        p.hgetall(keys.BATCHES_ENDED)
        *rows, ended = p.execute()
        by_status: dict[str, int] = {}
        lines = {"total": 0, "completed": 0, "failed": 0}
        for status, total, completed, failed in rows:
            if status is None:
                continue
            by_status[status] = by_status.get(status, 0) + 1
            for field, value in (("total", total), ("completed", completed), ("failed", failed)):
                lines[field] += int(value or 0)
        open_family = GaugeMetricFamily("queueformer_batches_open", "Batches not ended, by status.", labels=["status"])
        for status in ("validating", "in_progress", "finalizing", "cancelling"):
            open_family.add_metric([status], by_status.get(status, 0))
        yield open_family
        ended_family = Metric("queueformer_batches_ended", "Batches that reached an end status, by status.", "counter")
        for status in ("completed", "failed", "expired", "cancelled"):
            ended_family.add_sample("queueformer_batches_ended_total", {"status": status}, float(ended.get(status, 0)))
        yield ended_family
        progress = GaugeMetricFamily(
            "queueformer_open_batch_lines",
            "Lines of the batches not ended: total, and done so far by outcome (completed, failed).",
            labels=["state"],
        )
        for field, value in lines.items():
            progress.add_metric([field], value)
        yield progress


def cluster_registry(client: redis.Redis) -> CollectorRegistry:
    """A registry for one scrape: what Redis holds now (families vary with the workers alive)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterMetrics(client))
    return registry
