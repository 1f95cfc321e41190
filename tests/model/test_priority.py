"""Priorities on a real cluster: an urgent job submitted behind a long batch on the same model runs at
once, ahead of the batch's queued chunks and of the lines waiting in the engine; a job below the batch's
priority waits behind them. Tenant defaults and batch lines follow the same rule."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from queueformer.client import Client
from queueformer.server.cluster import Cluster
from queueformer.server.tenants import TenantDefaults
from tests.conftest import free_port
from tests.helpers import eventually, jsonl, make_settings

LINES, NEW_TOKENS = 3000, 64


@pytest.fixture(scope="module")
def cluster(module_redis_url: str, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("priority")
    settings = make_settings(module_redis_url, tmp, tiny_models, quota={"max_enqueued_tokens": 10**9})
    c = Cluster(settings, api_port=free_port(), worker_groups=[["tiny-gpt2"]], worker_concurrency=8)
    with c.running(timeout=240):
        yield c


def _long_batch(qf: Client, lines: int = LINES, **extra: int) -> dict[str, object]:
    body = {"task": "generate", "model": "tiny-gpt2", "prompt": "The weather today", "max_new_tokens": NEW_TOKENS}
    rows = [
        {"custom_id": f"l{i}", "method": "POST", "url": "/v1/jobs", "body": {**body, "ignore_eos": True}}
        for i in range(lines)
    ]
    file_id = qf.upload(jsonl(rows))["id"]
    return qf.create_batch(file_id, "/v1/jobs", **extra)


def test_urgent_job_behind_a_long_batch_runs_at_once(cluster: Cluster) -> None:
    with Client(cluster.api_url) as qf:
        batch = _long_batch(qf)
        assert batch["priority"] == 2  # a batch's default: background work, below a job's 5
        # The batch saturates the worker: every consumer slot holds a chunk, the engine's rows are full.
        eventually(lambda: qf.batch(str(batch["id"]))["request_counts"]["completed"] > 0, timeout=120)
        urgent = qf.submit(
            {"task": "generate", "model": "tiny-gpt2", "prompt": "The cat", "max_new_tokens": 8, "priority": 9}
        )
        late = qf.submit(
            {"task": "generate", "model": "tiny-gpt2", "prompt": "The dog", "max_new_tokens": 8, "priority": 0}
        )
        record = qf.wait(urgent, timeout=120)
        progress = qf.batch(str(batch["id"]))
        behind = qf.job(late)
        qf.cancel_batch(str(batch["id"]))
        assert record["state"] == "succeeded" and record["priority"] == 9
        done = progress["request_counts"]["completed"]
        # It finished while most of the batch was still to run...
        assert progress["status"] == "in_progress" and done < LINES / 2, progress["request_counts"]
        # ...and the job below the batch's priority still waits behind the batch's lines.
        assert behind["state"] in ("queued", "running") and behind["priority"] == 0
        # Its whole latency is a small part of what the batch still had to run at the rate it ran.
        elapsed = record["finished_at"] - progress["in_progress_at"]
        remaining_s = (LINES - done) * elapsed / max(1, done)
        assert record["finished_at"] - record["created_at"] < remaining_s / 4, (record, done, elapsed)
        assert qf.wait(late, timeout=300)["state"] == "succeeded"  # once the batch is cancelled, it runs


def test_tenant_defaults_and_line_priorities(cluster: Cluster) -> None:
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    defaults = TenantDefaults(r)
    assert defaults.set("default", priority=7, batch_priority=4).priority == 7
    try:
        with Client(cluster.api_url) as qf:
            job = qf.submit({"task": "generate", "model": "tiny-gpt2", "prompt": "Hi", "max_new_tokens": 2})
            assert qf.wait(job, timeout=60)["priority"] == 7
            batch = _long_batch(qf, lines=2)
            assert batch["priority"] == 4
            explicit = _long_batch(qf, lines=2, priority=8)
            assert explicit["priority"] == 8
            # A line cannot run at a priority of its own: one message carries many lines.
            row = {"task": "generate", "model": "tiny-gpt2", "prompt": "Hi", "max_new_tokens": 2}
            lines = [
                {"custom_id": "ok", "method": "POST", "url": "/v1/jobs", "body": row},
                {"custom_id": "own", "method": "POST", "url": "/v1/jobs", "body": {**row, "priority": 1}},
            ]
            bad = qf.create_batch(qf.upload(jsonl(lines))["id"], "/v1/jobs")
            ended = qf.wait_batch(str(bad["id"]), timeout=60)
            assert ended["request_counts"]["completed"] == 1 and ended["request_counts"]["failed"] == 1
            errors = httpx.get(f"{cluster.api_url}/v1/batches/{bad['id']}/output", params={"errors": "true"}).text
            assert "batch's priority (4)" in errors
        with pytest.raises(ValueError, match="0 to 9"):
            defaults.set("default", priority=10)
        response = httpx.post(
            f"{cluster.api_url}/v1/jobs", json={"task": "echo", "model": "echo", "text": "x", "priority": 10}
        )
        assert response.status_code == 422
    finally:
        defaults.reset("default")
