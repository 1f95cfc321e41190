"""Hostile input gets a clear 4xx (never a 500); tests/chaos/test_schemathesis.py fuzzes the whole OpenAPI schema."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from queueformer.client import Client
from queueformer.contract.registry import Registry
from queueformer.contract.units import RUN_TASK
from queueformer.server.broker import make_celery
from queueformer.server.cluster import Cluster
from tests.helpers import eventually, jsonl, make_settings

GEN = {"task": "generate", "model": "tiny-gpt2", "prompt": "hello"}


@pytest.fixture
def api(redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(redis_url, tmp_path))) as client:
        yield client


def post_raw(api: TestClient, path: str, body: bytes | list[bytes]) -> Any:
    # A list is sent as a chunked stream: no Content-Length for the size check to trust.
    content = iter(body) if isinstance(body, list) else body
    return api.post(path, content=content, headers={"content-type": "application/json"})


TEN_MB = b'{"task":"echo","model":"echo","text":"' + b"a" * (10 << 20) + b'"}'
DEEP = b"[" * 100_000 + b"]" * 100_000

HOSTILE: list[tuple[str, str, Any, int, str]] = [
    ("10 MB body", "/v1/jobs", TEN_MB, 413, "payload_too_large"),
    ("10 MB chunked body", "/v1/jobs", [TEN_MB[i : i + (1 << 20)] for i in range(0, len(TEN_MB), 1 << 20)], 413, ""),
    ("invalid UTF-8", "/v1/jobs", b'{"task":"echo","model":"echo","text":"\xff\xfe\xfd"}', 400, "invalid_json"),
    ("deeply nested JSON", "/v1/jobs", b'{"task":"echo","model":"echo","metadata":' + DEEP + b"}", 400, "invalid_json"),
    ("deeply nested bulk", "/v1/jobs/bulk", b'{"jobs":' + DEEP + b"}", 400, "invalid_json"),
    ("nested below the parser's limit", "/v1/jobs", {**GEN, "metadata": json.loads("[" * 500 + "]" * 500)}, 422, ""),
    ("not JSON at all", "/v1/jobs", b"\x00\x01garbage", 400, "invalid_json"),
    ("truncated JSON", "/v1/jobs", b'{"task":"echo","model":', 400, "invalid_json"),
    ("a JSON string, not an object", "/v1/jobs", b'"echo"', 422, "invalid_input"),
    ("unknown model", "/v1/jobs", {**GEN, "model": "gpt-99"}, 404, "model_not_found"),
    ("model name with a path", "/v1/jobs", {**GEN, "model": "../../etc/passwd"}, 422, "invalid_input"),
    ("negative max_new_tokens", "/v1/jobs", {**GEN, "max_new_tokens": -1}, 422, "invalid_input"),
    ("huge max_new_tokens", "/v1/jobs", {**GEN, "max_new_tokens": 10**12}, 422, "invalid_input"),
    # tiny-gpt2 holds 256 tokens in all (its registry entry): 256 new tokens leave no room for a prompt
    ("max_new_tokens past the context window", "/v1/jobs", {**GEN, "max_new_tokens": 256}, 422, "input_too_long"),
    ("bulk job past the context window", "/v1/jobs/bulk", {"jobs": [GEN, {**GEN, "max_new_tokens": 300}]}, 422, ""),
    ("prompt over the character limit", "/v1/jobs", {**GEN, "prompt": "x" * 40_000}, 422, "invalid_input"),
    ("NUL in the prompt", "/v1/jobs", {**GEN, "prompt": "a\x00b"}, 422, "invalid_input"),
    ("wrong type", "/v1/jobs", {**GEN, "do_sample": [1]}, 422, "invalid_input"),
    ("unknown task", "/v1/jobs", {"task": "rm -rf /", "model": "echo"}, 422, "invalid_input"),
    ("unknown field", "/v1/jobs", {**GEN, "__class__": "x"}, 422, "invalid_input"),
    ("bulk over its cap", "/v1/jobs/bulk", {"jobs": [GEN] * 10_001}, 422, "invalid_input"),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "code"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_get_clear_4xx(api: TestClient, name: str, path: str, body: Any, status: int, code: str) -> None:
    resp = post_raw(api, path, body) if isinstance(body, bytes | list) else api.post(path, json=body)
    assert resp.status_code == status, (name, resp.status_code, resp.text[:300])
    error = resp.json()["error"]  # every refusal has the one error shape, with a message saying why
    assert error["message"] and (error["code"] == code if code else error["code"])


FT = {"model": "tiny-gpt2", "training_file": "file-0123456789abcdef0123456789abcdef"}
HUGE_INT = b"9" * 5000  # past Python's 4,300-digit integer conversion limit

NAMED: list[tuple[str, str, str, Any, str]] = [
    *[
        (
            f"learning_rate_multiplier={v!r}",
            "POST",
            "/v1/fine_tuning/jobs",
            {**FT, "hyperparameters": {"learning_rate_multiplier": v}},
            "hyperparameters.learning_rate_multiplier",
        )
        for v in ("abc", None, [1.0], {"x": 1}, 10**9)
    ],
    (
        "n_epochs as a string",
        "POST",
        "/v1/fine_tuning/jobs",
        {**FT, "hyperparameters": {"n_epochs": "3"}},
        "hyperparameters.n_epochs",
    ),
    (
        "both epoch names",
        "POST",
        "/v1/fine_tuning/jobs",
        {**FT, "hyperparameters": {"n_epochs": 1, "epochs": 0}},
        "hyperparameters.epochs",
    ),
    ("before=nan", "GET", "/v1/jobs?before=nan", None, "before"),
    ("before=inf", "GET", "/v1/jobs?before=inf", None, "before"),
    ("ignore_eos with beams", "POST", "/v1/jobs", {**GEN, "ignore_eos": True, "num_beams": 2}, "ignore_eos"),
    ("a 5,000-digit integer", "POST", "/v1/jobs", b'{"task":"echo","model":"echo","timeout_s":' + HUGE_INT + b"}", ""),
]


@pytest.mark.parametrize(("name", "method", "path", "body", "param"), NAMED, ids=[n[0] for n in NAMED])
def test_inputs_that_once_gave_500s_get_a_4xx_naming_the_field(
    api: TestClient, name: str, method: str, path: str, body: Any, param: str
) -> None:
    resp = post_raw(api, path, body) if isinstance(body, bytes) else api.request(method, path, json=body)
    assert 400 <= resp.status_code < 500, (name, resp.status_code, resp.text[:300])
    error = resp.json()["error"]
    assert error["param"] == (param or None) and error["message"], (name, error)


def test_event_ids_past_what_a_stream_holds_are_refused_by_name(api: TestClient) -> None:
    fid = api.post("/v1/files", files={"file": ("t.jsonl", b'{"text": "x"}\n')}, data={"purpose": "fine-tune"}).json()
    ft = api.post("/v1/fine_tuning/jobs", json={**FT, "training_file": fid["id"]}).json()
    events = f"/v1/fine_tuning/jobs/{ft['id']}/events"
    assert api.get(events).status_code == 200
    for after in ("ftevent-999999999999999999999999999999-0", "ftevent-1-99999999999999999999", "ftevent-x-1"):
        resp = api.get(events, params={"after": after})
        assert resp.status_code == 422 and resp.json()["error"]["param"] == "after", resp.text[:300]
    assert api.get(events, params={"after": "ftevent-9999999999999999999-0"}).status_code == 200  # the largest taken
    job = api.post("/v1/jobs", json={"task": "echo", "model": "echo", "text": "hi"}).json()
    resp = api.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "99999999999999999999999-0"})
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "last-event-id", resp.text[:300]


def test_a_batch_line_holding_a_5000_digit_integer_is_a_line_error(api: TestClient) -> None:
    line = b'{"custom_id": "huge", "method": "POST", "url": "/v1/jobs", '
    line += b'"body": {"task": "echo", "model": "echo", "timeout_s": '
    content = jsonl(
        [{"custom_id": "fine", "method": "POST", "url": "/v1/jobs", "body": {"task": "echo", "model": "echo"}}]
    )
    content += line + HUGE_INT + b"}}\n"
    fid = api.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}).json()["id"]
    resp = api.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/jobs"})
    assert resp.status_code == 200, resp.text[:300]
    assert [(e["line"], e["code"]) for e in resp.json()["errors"]["data"]] == [(2, "invalid_json")]
    api.post(f"/v1/batches/{resp.json()['id']}/cancel")


def test_bulk_errors_name_the_job(api: TestClient) -> None:
    resp = api.post("/v1/jobs/bulk", json={"jobs": [GEN, {**GEN, "max_new_tokens": 300}]})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "input_too_long"
    assert resp.json()["error"]["param"] == "jobs.1.max_new_tokens"
    assert api.get("/v1/jobs").json()["data"] == []  # nothing of a refused request was queued


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/..%2F..%2Fetc%2Fpasswd",
        "/v1/jobs/job-..%2F..%2Fx",
        "/v1/files/..%2Fsecret/content",
        "/v1/batches/batch_%2e%2e",
        "/v1/jobs/%00",
        "/v1/files/file-0123456789abcdef%2F..%2F..%2Fx",
    ],
)
def test_path_traversal_ids_are_not_found(api: TestClient, path: str) -> None:
    resp = api.get(path)
    assert resp.status_code == 404, (path, resp.text)
    assert resp.json()["error"]["code"]


def test_duplicate_custom_ids_and_bad_lines_get_4xx_line_errors(api: TestClient) -> None:
    line = {"custom_id": "same", "method": "POST", "url": "/v1/jobs", "body": {"task": "echo", "model": "echo"}}
    bad = {"custom_id": "bad", "method": "POST", "url": "/v1/jobs", "body": {"task": "echo", "model": "echo", "x": 1}}
    unknown = {**line, "custom_id": "unknown", "body": {**GEN, "model": "gpt-99"}}
    too_long = {**line, "custom_id": "too-long", "body": {**GEN, "max_new_tokens": 1000}}
    deep = b'{"custom_id": "deep", "method": "POST", "url": "/v1/jobs", "body": ' + DEEP + b"}\n"
    content = jsonl([line, line, bad, unknown, too_long]) + deep + jsonl([{**line, "custom_id": "fine"}])
    fid = api.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}).json()["id"]
    resp = api.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/jobs", "completion_window": "24h"})
    assert resp.status_code == 200, resp.text[:300]
    batch = resp.json()
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == [
        (2, "duplicate_custom_id"),
        (3, "invalid_request"),
        (4, "model_not_found"),
        (5, "input_too_long"),
        (6, "invalid_json"),
    ]
    assert batch["request_counts"] == {"total": 7, "completed": 0, "failed": 5}
    api.post(f"/v1/batches/{batch['id']}/cancel")
    err_file = api.get(f"/v1/batches/{batch['id']}").json()["error_file_id"]
    errors = [json.loads(x) for x in api.get(f"/v1/files/{err_file}/content").text.splitlines()]
    line_errors = [e for e in errors if e["response"]]
    assert sorted(e["response"]["status_code"] for e in line_errors) == [400] * 5


def test_uploads_over_the_cap_get_413_even_when_chunked(redis_url: str, tmp_path: Path) -> None:
    import httpx

    cap = 100_000
    with TestClient(create_app(make_settings(redis_url, tmp_path, quota={"max_upload_bytes": cap}))) as api:
        for size in (cap + 1, cap + 200_000):  # under the request cap (file cap + 64 KiB of form), then over it
            request = httpx.Request(
                "POST", "http://x/v1/files", files={"file": ("in.jsonl", b"x" * size)}, data={"purpose": "batch"}
            )
            body = request.read()
            chunked = iter([body[i : i + 65536] for i in range(0, len(body), 65536)])
            resp = api.post("/v1/files", content=chunked, headers={"content-type": request.headers["content-type"]})
            assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large", resp.text[:300]
        assert api.get("/v1/files").json()["data"] == []  # nothing half-written was recorded


def test_batch_endpoint_and_file_mistakes_are_4xx(api: TestClient) -> None:
    assert api.post("/v1/batches", json={"input_file_id": "file-nope", "endpoint": "/v1/jobs"}).status_code == 404
    fid = api.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "fine-tune"}).json()["id"]
    assert api.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/jobs"}).status_code == 422
    assert api.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/embeddings"}).status_code == 422
    assert api.post("/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "evil"}).status_code == 422


def test_prompts_past_the_context_window_fail_as_input_too_long(chaos_cluster: tuple[Cluster, Any]) -> None:
    """How many tokens a prompt takes only the worker's tokenizer knows: there it is a clear 4xx-class error."""
    cluster, new_worker = chaos_cluster
    long_prompt = "The weather today is sunny. " * 60  # about 1,700 characters: far past tiny-gpt2's 256 tokens
    job = {**GEN, "prompt": long_prompt, "max_new_tokens": 8}
    lines = [
        {"custom_id": "long", "method": "POST", "url": "/v1/jobs", "body": job},
        {"custom_id": "short", "method": "POST", "url": "/v1/jobs", "body": {**job, "prompt": "The weather"}},
    ]
    new_worker(["tiny-gpt2"])
    with Client(cluster.api_url) as qf:
        failed = qf.wait(qf.submit(job), timeout=120)
        assert failed["state"] == "failed" and failed["error"]["code"] == "input_too_long"
        assert failed["error"]["retryable"] is False and failed["attempts"] == 1  # refused once, never retried
        done = qf.wait_batch(qf.create_batch(qf.upload(jsonl(lines))["id"], "/v1/jobs")["id"], timeout=120)
        out, err = qf.batch_results(done)
        assert [o["custom_id"] for o in out] == ["short"]
        assert [(e["custom_id"], e["response"]["status_code"]) for e in err] == [("long", 422)]
        assert err[0]["response"]["body"]["error"]["code"] == "input_too_long"


class _Unpickled:
    """Unpickling this makes a directory: proof that a worker deserialised a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (self.marker,)


HOSTILE_ENCODING = "pickle"  # what workers must refuse: they accept JSON only


def test_a_pickled_celery_message_is_refused(chaos_cluster: tuple[Cluster, Any], tmp_path: Path) -> None:
    cluster, new_worker = chaos_cluster
    marker = tmp_path / "unpickled"
    # Published exactly as an attacker with broker access would: a well-formed task message, pickle-encoded.
    publisher = make_celery(cluster.settings, Registry.load(cluster.settings.registry))
    unit = {"v": 1, "kind": "jobs", "model": "echo", "ids": [_Unpickled(marker)]}
    publisher.send_task(RUN_TASK, kwargs={"unit": unit}, queue="echo", serializer=HOSTILE_ENCODING)
    assert cluster.settings.redis_url is not None
    r = redis.Redis.from_url(cluster.settings.redis_url.get_secret_value())
    assert r.llen("echo") == 1
    worker = new_worker(["echo"])
    with Client(cluster.api_url) as qf:
        # The pickle sits ahead of this job in the queue; the job runs once the worker has dealt with it.
        assert (
            qf.wait(qf.submit({"task": "echo", "model": "echo", "text": "after"}), timeout=120)["state"] == "succeeded"
        )
    eventually(lambda: r.llen("echo") == 0 and r.hlen("unacked") == 0, timeout=30)  # dropped, not redelivered
    assert not marker.exists()
    log = worker.log_path.read_text(errors="replace")
    assert "ContentDisallowed" in log or "untrusted content" in log, log[-2000:]
