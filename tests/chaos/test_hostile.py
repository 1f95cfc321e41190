"""Hostile input gets a clear 4xx (never a 500), and fuzzing the OpenAPI schema finds no server error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from tests.helpers import jsonl, make_settings

GEN = {"task": "generate", "model": "tiny-gpt2", "prompt": "hello"}


@pytest.fixture
def api(redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(redis_url, tmp_path))) as client:
        yield client


def post_raw(api: TestClient, path: str, body: bytes) -> Any:
    return api.post(path, content=body, headers={"content-type": "application/json"})


HOSTILE: list[tuple[str, str, Any, int, str]] = [
    (
        "10 MB body",
        "/v1/jobs",
        b'{"task":"echo","model":"echo","text":"' + b"a" * (10 << 20) + b'"}',
        413,
        "payload_too_large",
    ),
    ("invalid UTF-8", "/v1/jobs", b'{"task":"echo","model":"echo","text":"\xff\xfe\xfd"}', 422, ""),
    (
        "deeply nested JSON",
        "/v1/jobs",
        b'{"task":"echo","model":"echo","metadata":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        400,
        "",
    ),
    ("not JSON at all", "/v1/jobs", b"\x00\x01garbage", 422, ""),
    ("unknown model", "/v1/jobs", {**GEN, "model": "gpt-99"}, 404, "model_not_found"),
    ("negative max_new_tokens", "/v1/jobs", {**GEN, "max_new_tokens": -1}, 422, "invalid_input"),
    ("huge max_new_tokens", "/v1/jobs", {**GEN, "max_new_tokens": 10**12}, 422, "invalid_input"),
    ("prompt over the character limit", "/v1/jobs", {**GEN, "prompt": "x" * 40_000}, 422, "invalid_input"),
    ("wrong type", "/v1/jobs", {**GEN, "do_sample": [1]}, 422, "invalid_input"),
    ("unknown task", "/v1/jobs", {"task": "rm -rf /", "model": "echo"}, 422, "invalid_input"),
    ("bulk over its cap", "/v1/jobs/bulk", {"jobs": [GEN] * 10_001}, 413, ""),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "code"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_get_clear_4xx(api: TestClient, name: str, path: str, body: Any, status: int, code: str) -> None:
    resp = post_raw(api, path, body) if isinstance(body, bytes) else api.post(path, json=body)
    assert resp.status_code in (status, 413, 422) and 400 <= resp.status_code < 500, (
        name,
        resp.status_code,
        resp.text[:300],
    )
    if code:
        assert resp.json()["error"]["code"] == code


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


def test_duplicate_custom_ids_and_bad_lines_get_4xx_line_errors(api: TestClient) -> None:
    line = {"custom_id": "same", "method": "POST", "url": "/v1/jobs", "body": {"task": "echo", "model": "echo"}}
    bad = {"custom_id": "bad", "method": "POST", "url": "/v1/jobs", "body": {"task": "echo", "model": "echo", "x": 1}}
    fid = api.post(
        "/v1/files", files={"file": ("in.jsonl", jsonl([line, line, bad]))}, data={"purpose": "batch"}
    ).json()["id"]
    batch = api.post(
        "/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/jobs", "completion_window": "24h"}
    ).json()
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == [
        (2, "duplicate_custom_id"),
        (3, "invalid_request"),
    ]
    api.post(f"/v1/batches/{batch['id']}/cancel")
    err_file = api.get(f"/v1/batches/{batch['id']}").json()["error_file_id"]
    errors = [json.loads(x) for x in api.get(f"/v1/files/{err_file}/content").text.splitlines()]
    line_errors = [e for e in errors if e["response"]]
    assert sorted(e["response"]["status_code"] for e in line_errors) == [400, 400]


def test_batch_endpoint_and_file_mistakes_are_4xx(api: TestClient) -> None:
    assert api.post("/v1/batches", json={"input_file_id": "file-nope", "endpoint": "/v1/jobs"}).status_code == 404
    fid = api.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "fine-tune"}).json()["id"]
    assert api.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/jobs"}).status_code == 422
    assert api.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/embeddings"}).status_code == 422
    assert api.post("/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "evil"}).status_code == 422


def test_schemathesis_finds_no_server_error(redis_url: str, tmp_path: Path) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation.modes import GenerationMode

    app = create_app(make_settings(redis_url, tmp_path))
    failures: list[str] = []
    calls = 0
    with TestClient(app):  # runs the lifespan so the services exist
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        # The event stream holds its connection open by design; every other operation is fuzzed.
        for result in schema.exclude(path_regex=r"/events$").get_all_operations():
            operation = result.ok()  # type: ignore[union-attr]
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
                @given(case=operation.as_strategy(mode))
                def check(case: Any) -> None:
                    nonlocal calls
                    calls += 1
                    response = case.call()
                    try:
                        case.validate_response(response, checks=[not_a_server_error])
                    except Exception as exc:
                        failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {exc}"[:500])

                check()
    assert calls > 200
    assert failures == []
