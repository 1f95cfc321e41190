"""Job records on a real Redis: compare-and-set transitions, TTLs, quotas and events."""

from __future__ import annotations

import pytest
import redis

from queueformer.contract.errors import ErrorInfo, NotFound
from queueformer.contract.ids import new_id
from queueformer.contract.records import JobState
from queueformer.contract.tasks import parse_job
from queueformer.server import keys
from queueformer.server.jobs import JobStore


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url, decode_responses=True), record_ttl_s=60)


def create(store: JobStore, tenant: str = "t1", tokens: int = 10) -> str:
    job_id = new_id("job")
    spec = parse_job({"task": "echo", "model": "echo", "text": "x"})
    store.create_many([(job_id, spec)], tenant=tenant, queue={job_id: "echo"}, estimate_tokens={job_id: tokens})
    return job_id


def test_lifecycle_and_tenant_isolation(store: JobStore) -> None:
    job_id = create(store)
    assert store.get(job_id, "t1").state == JobState.QUEUED
    with pytest.raises(NotFound):
        store.get(job_id, "t2")
    started, _ = store.start(job_id)
    assert started and store.get(job_id).state == JobState.RUNNING
    assert store.succeed(job_id, "file:///r.json")
    record = store.get(job_id)
    assert record.state == JobState.SUCCEEDED and record.attempts == 1
    # The record keeps the storage URI; what clients see is the API path of the result.
    assert store.raw(job_id)["result_uri"] == "file:///r.json" and record.result_url == f"/v1/jobs/{job_id}/result"
    assert "file://" not in record.model_dump_json() and "file://" not in str(store.read_events(job_id))
    assert 0 < store.r.ttl(keys.job(job_id)) <= 60
    assert [e[1] for e in store.read_events(job_id)] == ["state", "state", "state"]


def test_finished_jobs_never_move_again(store: JobStore) -> None:
    job_id = create(store)
    store.start(job_id)
    assert store.succeed(job_id, "file:///r.json")
    assert not store.fail(job_id, ErrorInfo(code="x", message="late failure"))
    assert not store.succeed(job_id, "file:///other.json")
    started, _ = store.start(job_id)  # a redelivered message
    assert not started
    assert store.raw(job_id)["result_uri"] == "file:///r.json"


def test_redelivery_counts_attempts(store: JobStore) -> None:
    job_id = create(store)
    store.start(job_id)
    store.start(job_id)
    assert store.get(job_id).attempts == 2


def test_quota_is_released_when_a_job_ends(store: JobStore) -> None:
    a, b = create(store, tokens=30), create(store, tokens=12)
    assert int(store.r.get(keys.tenant_tokens("t1"))) == 42
    store.fail(a, ErrorInfo(code="invalid_input", message="bad"))
    store.start(b)
    store.succeed(b, "file:///x")
    assert int(store.r.get(keys.tenant_tokens("t1"))) == 0


def test_cancel_queued_at_once_and_flag_running(store: JobStore) -> None:
    queued = create(store)
    assert store.request_cancel(queued) == JobState.CANCELLED
    assert store.get(queued).error.code == "cancelled"
    running = create(store)
    store.start(running)
    assert store.request_cancel(running) == JobState.RUNNING
    assert store.cancel_requested([running, queued]) == {running}
