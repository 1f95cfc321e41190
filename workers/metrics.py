"""Prometheus metrics of a worker: on its health port (``/metrics``), and published to Redis for the API.

A Prometheus user expects one scrape target per cluster, and ``queueformer up`` runs workers without
open ports: so every worker also writes a snapshot of this registry to Redis every few seconds
(``MetricsPublisher``, a key with a TTL under ``keys.worker_metrics``), and the API's ``/metrics`` adds
every live worker's samples with a ``worker`` label (``api.metrics.WorkerMetrics``). A dead worker's
series disappear with its key, as they would with its pod. The health port keeps serving the same
registry, for setups that scrape every pod.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from queueformer.server import keys
from workers.engine.device import memory_stats

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, CPU seconds, open files

JOBS = Counter(
    "queueformer_worker_jobs_total",
    "Jobs and batch lines finished, by outcome.",
    ["model", "task", "outcome"],
    registry=REGISTRY,
)
WAIT = Histogram(
    "queueformer_job_wait_seconds",
    "Seconds from submission to the start of work: jobs (kind=job) and batch lines (kind=batch_line, from the "
    "batch's creation).",
    ["model", "kind"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 1800, 7200),
    registry=REGISTRY,
)
RUN = Histogram(
    "queueformer_job_run_seconds",
    "Seconds a job or line spent in the engine.",
    ["model"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 3600),
    registry=REGISTRY,
)
TOKENS = Counter("queueformer_tokens_generated_total", "New tokens produced.", ["model"], registry=REGISTRY)
TOKENS_PER_S = Gauge(
    "queueformer_tokens_per_second",
    "New tokens per second over the last publishing interval (rate() of the counter says the same, smoothed).",
    ["model"],
    registry=REGISTRY,
)
FIRST_TOKEN = Histogram(
    "queueformer_time_to_first_token_seconds",
    "Seconds from handing a job or line to the engine to its first new token (queue wait excluded: see "
    "queueformer_job_wait_seconds).",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
ROWS = Gauge("queueformer_engine_rows", "Sequences in the running decode batch.", ["model"], registry=REGISTRY)
WAITING = Gauge(
    "queueformer_engine_waiting", "Sequences handed to the engine and waiting for a row.", ["model"], registry=REGISTRY
)
OCCUPANCY = Gauge(
    "queueformer_batch_occupancy_ratio",
    "Running rows over the model's max_batch_size (1: the batch is full).",
    ["model"],
    registry=REGISTRY,
)
KV_TOKENS = Gauge(
    "queueformer_kv_cache_tokens", "Token positions held in the KV cache (rows x width).", ["model"], registry=REGISTRY
)
KV_USAGE = Gauge(
    "queueformer_kv_cache_usage_ratio",
    "KV-cache token positions held over the model's kv_cache_tokens budget.",
    ["model"],
    registry=REGISTRY,
)
LINES = Counter(
    "queueformer_batch_lines_total",
    "Batch lines committed, by outcome (completed or failed).",
    ["model", "outcome"],
    registry=REGISTRY,
)
BATCH = Histogram(
    "queueformer_batch_size",
    "Rows per forward (decode step or encoder batch).",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY,
)
FORWARD = Histogram(
    "queueformer_forward_seconds",
    "Seconds per forward (decode step or encoder batch).",
    ["model"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
    registry=REGISTRY,
)
DEVICE_MEMORY = Gauge(
    "queueformer_device_memory_bytes",
    "Accelerator memory by device and kind (allocated, reserved, peak); absent on CPU-only workers.",
    ["device", "kind"],
    registry=REGISTRY,
)
MODEL_MEMORY = Gauge("queueformer_model_memory_bytes", "Weights of each loaded model.", ["model"], registry=REGISTRY)
MODEL_LOADS = Counter(
    "queueformer_model_loads_total", "Times a model was loaded in this process.", ["model"], registry=REGISTRY
)
IN_FLIGHT = Gauge("queueformer_worker_messages_in_flight", "Queue messages being worked on.", registry=REGISTRY)


def observe_forward(model: str, rows: int, _tokens: int, seconds: float) -> None:
    BATCH.labels(model).observe(rows)
    FORWARD.labels(model).observe(seconds)


def observe_decode_step(model: str, rows: int, tokens: int, seconds: float) -> None:
    observe_forward(model, rows, tokens, seconds)
    TOKENS.labels(model).inc(tokens)


def refresh_device_memory() -> None:
    for key, value in memory_stats().items():
        device, _, kind = key.partition(".")
        DEVICE_MEMORY.labels(device, kind).set(value)


class EngineView:
    """What the gauges read from one model's engine."""

    def __init__(self, model: str, engine: Any, max_batch_size: int, kv_cache_tokens: int) -> None:
        self.model, self.engine = model, engine
        self.max_batch_size, self.kv_cache_tokens = max_batch_size, kv_cache_tokens

    def refresh(self) -> None:
        rows = int(getattr(self.engine, "running", 0))
        ROWS.labels(self.model).set(rows)
        WAITING.labels(self.model).set(int(getattr(self.engine, "waiting", 0)))
        OCCUPANCY.labels(self.model).set(rows / max(1, self.max_batch_size))
        held = int(getattr(self.engine, "kv_tokens", 0))
        KV_TOKENS.labels(self.model).set(held)
        KV_USAGE.labels(self.model).set(held / max(1, self.kv_cache_tokens))


def snapshot() -> str:
    """This registry's samples as JSON: ``[[name, type, help, [[sample, labels, value], ...]], ...]``."""
    families = []
    for family in REGISTRY.collect():
        samples = [[s.name, s.labels, s.value] for s in family.samples if not s.name.endswith("_created")]
        families.append([family.name, family.type, family.documentation, samples])
    return json.dumps(families)


class MetricsPublisher:
    """Refreshes the gauges and writes a snapshot of the registry to Redis every ``interval_s``."""

    def __init__(
        self,
        client: redis.Redis,
        worker_id: str,
        engines: Callable[[], list[EngineView]],
        interval_s: float = 5.0,
    ) -> None:
        self.r, self.worker_id, self.engines, self.interval_s = client, worker_id, engines, interval_s
        self._tokens: dict[str, tuple[float, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def publish(self) -> None:
        now = time.monotonic()
        for view in self.engines():
            view.refresh()
        for family in TOKENS.collect():
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                model = sample.labels["model"]
                then, count = self._tokens.get(model, (now, sample.value))
                TOKENS_PER_S.labels(model).set((sample.value - count) / (now - then) if now > then else 0.0)
                self._tokens[model] = (now, sample.value)
        refresh_device_memory()
        # Three missed intervals and the snapshot is gone: the API shows no stale worker for long.
        self.r.set(keys.worker_metrics(self.worker_id), snapshot(), ex=int(3 * self.interval_s) + 5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish()
            except redis.RedisError:
                log.warning("could not publish metrics; Redis is away", exc_info=True)
            except Exception:  # a bug here must not stop the worker
                log.exception("metrics snapshot failed")
