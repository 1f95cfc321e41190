"""The HTTP API in-process against a real Redis: validation, allowlist, idempotency, tenants, limits."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from queueformer.server.jobs import JobStore
from queueformer.server.tenants import ApiKeys
from tests.helpers import jsonl, make_settings

GEN = {"task": "generate", "model": "tiny-gpt2", "prompt": "The weather today", "max_new_tokens": 8}


@pytest.fixture
def client(redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(make_settings(redis_url, tmp_path))
    with TestClient(app) as c:
        yield c


def test_valid_job_is_recorded_and_enqueued_on_its_model_queue(client: TestClient, redis_url: str) -> None:
    resp = client.post("/v1/jobs", json=GEN)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    record = client.get(f"/v1/jobs/{job_id}").json()
    assert record["state"] == "queued" and record["model"] == "tiny-gpt2"
    assert redis.Redis.from_url(redis_url).llen("tiny-gpt2") == 1
    assert client.get(f"/v1/jobs/{job_id}/result").status_code == 409


def test_invalid_body_gets_422_naming_the_field(client: TestClient) -> None:
    resp = client.post("/v1/jobs", json={**GEN, "max_new_tokens": -5})
    assert resp.status_code == 422
    body = resp.json()
    assert body["error"]["param"] == "max_new_tokens" and "max_new_tokens" in body["error"]["message"]
    assert body["detail"][0]["loc"][-1] == "max_new_tokens"
    resp = client.post("/v1/jobs", json={"task": "generate", "model": "tiny-gpt2"})
    assert resp.status_code == 202  # prompt defaults to "" (the model's start token)
    resp = client.post("/v1/jobs", json={"task": "fill-mask", "model": "tiny-bert"})
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "text"


def test_unknown_model_gets_404_listing_registered_names(client: TestClient) -> None:
    resp = client.post("/v1/jobs", json={**GEN, "model": "gpt-99"})
    assert resp.status_code == 404
    err = resp.json()["error"]
    assert err["code"] == "model_not_found" and "tiny-gpt2" in err["message"]
    assert set(err["registered"]) >= {"tiny-gpt2", "tiny-bert", "tiny-sentiment", "tiny-marian-en-de"}
    resp = client.post("/v1/jobs", json={**GEN, "model": "tiny-bert"})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "task_mismatch"


def test_idempotency_key_returns_the_same_job(client: TestClient) -> None:
    first = client.post("/v1/jobs", json=GEN, headers={"Idempotency-Key": "k1"}).json()["id"]
    again = client.post("/v1/jobs", json=GEN, headers={"Idempotency-Key": "k1"}).json()["id"]
    assert first == again
    other = client.post("/v1/jobs", json={**GEN, "prompt": "else"}, headers={"Idempotency-Key": "k1"})
    assert other.status_code == 409


def test_bulk_submission_groups_jobs_into_few_messages(client: TestClient, redis_url: str) -> None:
    resp = client.post(
        "/v1/jobs/bulk", json={"jobs": [{"task": "echo", "model": "echo", "text": str(i)} for i in range(300)]}
    )
    assert resp.status_code == 202 and len(resp.json()["data"]) == 300
    assert redis.Redis.from_url(redis_url).llen("echo") == 3  # 128 jobs per message


def test_tenants_are_isolated_and_keys_required(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url, tmp_path, api={"auth_required": True})
    keys = ApiKeys(redis.Redis.from_url(redis_url, decode_responses=True))
    a, b = keys.create("acme"), keys.create("globex")
    with TestClient(create_app(settings)) as c:
        assert c.post("/v1/jobs", json=GEN).status_code == 401
        assert c.post("/v1/jobs", json=GEN, headers={"Authorization": "Bearer nope"}).status_code == 401
        job_id = c.post("/v1/jobs", json=GEN, headers={"Authorization": f"Bearer {a}"}).json()["id"]
        assert c.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {a}"}).status_code == 200
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/result", f"/v1/jobs/{job_id}/events"):
            assert c.get(path, headers={"Authorization": f"Bearer {b}"}).status_code == 404
        assert c.post(f"/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {b}"}).status_code == 404
        assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {b}"}).json()["data"] == []
        fid = c.post(
            "/v1/files",
            files={"file": ("a.jsonl", b"{}\n")},
            data={"purpose": "batch"},
            headers={"Authorization": f"Bearer {a}"},
        ).json()["id"]
        assert c.get(f"/v1/files/{fid}/content", headers={"Authorization": f"Bearer {b}"}).status_code == 404
    stored = redis.Redis.from_url(redis_url, decode_responses=True).keys("qf:apikey:*")
    assert a not in str(stored) and len(stored) == 2  # only hashes are stored


def test_size_limits_answer_413(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url, tmp_path, quota={"max_upload_bytes": 1000, "max_lines_per_batch": 3})
    with TestClient(create_app(settings)) as c:
        resp = c.post(
            "/v1/jobs",
            content=b'{"task":"echo","model":"echo","text":"' + b"x" * (10 << 20) + b'"}',
            headers={"content-type": "application/json"},
        )
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
        resp = c.post("/v1/files", files={"file": ("a.jsonl", b"x" * 5000)}, data={"purpose": "batch"})
        assert resp.status_code == 413
        lines = [
            {"custom_id": str(i), "method": "POST", "url": "/v1/jobs", "body": {"task": "echo", "model": "echo"}}
            for i in range(4)
        ]
        fid = c.post("/v1/files", files={"file": ("a.jsonl", jsonl(lines))}, data={"purpose": "batch"}).json()["id"]
        resp = c.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/jobs", "completion_window": "24h"})
        assert resp.status_code == 413 and "3 lines" in resp.json()["error"]["message"]


def test_enqueued_token_quota_answers_429(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url, tmp_path, quota={"max_enqueued_tokens": 100})
    with TestClient(create_app(settings)) as c:
        assert c.post("/v1/jobs", json={**GEN, "max_new_tokens": 60}).status_code == 202
        resp = c.post("/v1/jobs", json={**GEN, "max_new_tokens": 60})
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "quota_exceeded"


def test_batch_create_reports_bad_lines_and_enqueues_the_rest(client: TestClient, redis_url: str) -> None:
    good = [
        {
            "custom_id": f"ok-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "tiny-gpt2", "prompt": "hi", "max_tokens": 2},
        }
        for i in range(5)
    ]
    bad = [
        {
            "custom_id": "ok-1",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "tiny-gpt2", "prompt": "x"},
        },
        {
            "custom_id": "neg",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "tiny-gpt2", "prompt": "x", "max_tokens": -1},
        },
    ]
    fid = client.post("/v1/files", files={"file": ("in.jsonl", jsonl(good + bad))}, data={"purpose": "batch"}).json()[
        "id"
    ]
    batch = client.post(
        "/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/completions", "completion_window": "24h"}
    ).json()
    assert batch["status"] == "in_progress" and batch["request_counts"] == {"total": 7, "completed": 0, "failed": 2}
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == [
        (6, "duplicate_custom_id"),
        (7, "invalid_request"),
    ]
    assert redis.Redis.from_url(redis_url).llen("tiny-gpt2") >= 1
    listed = client.get("/v1/batches", params={"limit": 1}).json()
    assert listed["data"][0]["id"] == batch["id"] and listed["has_more"] is False
    cancelled = client.post(f"/v1/batches/{batch['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["request_counts"]["failed"] == 7


def test_health_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    client.post("/v1/jobs", json=GEN)
    client.get("/v1/jobs/job-0123456789abcdef")
    client.get("/no/such/path")
    metrics = client.get("/metrics").text
    assert 'queueformer_queue_depth{queue="tiny-gpt2"} 1.0' in metrics
    # requests are labelled by route template (never the raw path, which would explode the series)
    assert 'queueformer_api_requests_total{method="POST",route="/v1/jobs",status="202"}' in metrics
    assert 'queueformer_api_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"}' in metrics
    assert 'queueformer_api_requests_total{method="GET",route="unmatched",status="404"}' in metrics
    assert 'queueformer_api_request_seconds_count{method="POST",route="/v1/jobs"}' in metrics
    assert client.get("/openapi.json").json()["paths"]["/v1/batches"]


def test_fine_tuning_jobs_are_validated_queued_and_tenant_isolated(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url, tmp_path, api={"auth_required": True})
    keys = ApiKeys(redis.Redis.from_url(redis_url, decode_responses=True))
    a, b = ({"Authorization": f"Bearer {keys.create(t)}"} for t in ("acme", "globex"))
    with TestClient(create_app(settings)) as c:
        fid = c.post(
            "/v1/files", files={"file": ("t.jsonl", jsonl([{"text": "hi"}]))}, data={"purpose": "fine-tune"}, headers=a
        ).json()["id"]
        body = {"model": "tiny-gpt2", "training_file": fid, "hyperparameters": {"n_epochs": 2, "batch_size": 4}}
        resp = c.post("/v1/fine_tuning/jobs", json={**body, "method": "qlora"}, headers=a)
        assert resp.status_code == 200, resp.text
        job = resp.json()
        assert job["object"] == "fine_tuning.job" and job["status"] == "queued" and job["fine_tuned_model"] is None
        assert job["hyperparameters"]["n_epochs"] == 2 and job["method"]["training"] == "qlora"
        assert redis.Redis.from_url(redis_url).llen("fine-tune") == 1  # one message per fine-tune, own queue
        # The file must be the caller's, the model registered and generative, the knobs in range.
        assert c.post("/v1/fine_tuning/jobs", json=body, headers=b).status_code == 404
        wrong = c.post("/v1/fine_tuning/jobs", json={**body, "model": "tiny-bert"}, headers=a)
        assert wrong.status_code == 422 and wrong.json()["error"]["code"] == "task_mismatch"
        bad_hp = {**body, "hyperparameters": {"max_steps": -1}}
        assert c.post("/v1/fine_tuning/jobs", json=bad_hp, headers=a).status_code == 422
        with_validation = c.post("/v1/fine_tuning/jobs", json={**body, "validation_file": fid}, headers=a)
        assert with_validation.status_code == 422 and with_validation.json()["error"]["param"] == "validation_file"
        for path in ("", "/events", "/checkpoints"):
            assert c.get(f"/v1/fine_tuning/jobs/{job['id']}{path}", headers=b).status_code == 404
        assert c.get("/v1/fine_tuning/jobs", headers=b).json()["data"] == []
        assert [j["id"] for j in c.get("/v1/fine_tuning/jobs", headers=a).json()["data"]] == [job["id"]]
        cancelled = c.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=a).json()
        assert cancelled["status"] == "cancelled"
        events = c.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=a).json()["data"]
        assert [e["message"] for e in events][:1] == ["Job is cancelled"]


def test_cancel_answers_where_the_cancel_stands_with_a_status_url(client: TestClient, redis_url: str) -> None:
    queued = client.post("/v1/jobs", json=GEN).json()["id"]
    answer = client.post(f"/v1/jobs/{queued}/cancel").json()
    assert answer["status"] == "cancelled" and answer["state"] == "cancelled"
    assert answer["status_url"] == f"/v1/jobs/{queued}"
    assert client.get(answer["status_url"]).json()["state"] == "cancelled"

    running = client.post("/v1/jobs", json=GEN).json()["id"]
    jobs = JobStore(redis.Redis.from_url(redis_url, decode_responses=True))
    assert jobs.start(running)[0]  # claimed, as a worker claims it
    answer = client.post(f"/v1/jobs/{running}/cancel").json()
    assert answer["status"] == "cancelling" and answer["status_url"] == f"/v1/jobs/{running}"
    assert jobs.cancel_requested([running]) == {running}

    jobs.succeed(running, "file:///nowhere")
    assert client.post(f"/v1/jobs/{running}/cancel").json()["status"] == "succeeded"


def test_models_carry_created(client: TestClient) -> None:
    before = int(time.time())
    models = client.get("/v1/models").json()["data"]
    assert models and all(isinstance(m["created"], int) and 0 < m["created"] <= before + 1 for m in models)
    assert {m["object"] for m in models} == {"model"}
