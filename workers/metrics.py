"""Prometheus metrics a worker exports on its health port (``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

JOBS = Counter(
    "queueformer_worker_jobs_total",
    "Jobs and batch lines finished, by outcome.",
    ["model", "task", "outcome"],
    registry=REGISTRY,
)
WAIT = Histogram(
    "queueformer_job_wait_seconds",
    "Seconds from submission to the start of work.",
    ["model"],
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
    "queueformer_device_memory_bytes", "Device memory by device and kind.", ["device", "kind"], registry=REGISTRY
)
MODEL_MEMORY = Gauge("queueformer_model_memory_bytes", "Weights of each loaded model.", ["model"], registry=REGISTRY)
MODEL_LOADS = Counter(
    "queueformer_model_loads_total", "Times a model was loaded in this process.", ["model"], registry=REGISTRY
)
PREFIX_ROWS = Counter(
    "queueformer_prefix_rows_total",
    "Sequences admitted to a decode engine, by whether they started from a shared prompt prefix (hit) or not.",
    ["model", "outcome"],
    registry=REGISTRY,
)
PREFILL_SAVED = Counter(
    "queueformer_prefill_tokens_saved_total",
    "Prompt tokens not prefilled because their keys and values were shared from a common prefix.",
    ["model"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge("queueformer_worker_messages_in_flight", "Queue messages being worked on.", registry=REGISTRY)


def observe_forward(model: str, rows: int, _tokens: int, seconds: float) -> None:
    BATCH.labels(model).observe(rows)
    FORWARD.labels(model).observe(seconds)


def observe_decode_step(model: str, rows: int, tokens: int, seconds: float) -> None:
    observe_forward(model, rows, tokens, seconds)
    TOKENS.labels(model).inc(tokens)


def observe_prefix(model: str, rows: int, hits: int, saved: int) -> None:
    """Hit rate is ``hit / (hit + miss)`` of ``queueformer_prefix_rows_total``."""
    PREFIX_ROWS.labels(model, "hit").inc(hits)
    PREFIX_ROWS.labels(model, "miss").inc(rows - hits)
    PREFILL_SAVED.labels(model).inc(saved)
