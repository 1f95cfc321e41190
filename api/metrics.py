"""Prometheus metrics of the API process: requests, submissions, the depth of every queue, webhooks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from api.history import queue_depths

if TYPE_CHECKING:
    from api.services import Services

REGISTRY = CollectorRegistry(auto_describe=True)

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
