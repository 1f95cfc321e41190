"""Batch lines: validation, mapping to jobs, and the output shapes OpenAI clients parse."""

from __future__ import annotations

import json

import pytest

from queueformer.contract.errors import ErrorInfo, InputTooLong
from queueformer.contract.jobs import ClassifyJob, FillMaskJob, GenerateJob, TranslateJob
from queueformer.contract.openai_batch import (
    LineError,
    error_line,
    error_line_for,
    output_line,
    parse_line,
    response_body,
)
from queueformer.contract.records import GenerateResult, Generation, Usage


def line(url: str, body: dict, cid: str = "r1") -> bytes:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}).encode()


def test_completions_follow_openai_semantics() -> None:
    _, job = parse_line(line("/v1/completions", {"model": "m", "prompt": "hi"}), "/v1/completions")
    assert isinstance(job, GenerateJob)
    assert job.max_new_tokens == 16 and job.do_sample is True and job.temperature == 1.0 and job.top_k == 0
    _, greedy = parse_line(
        line("/v1/completions", {"model": "m", "prompt": "hi", "temperature": 0, "max_tokens": 5, "stop": "."}),
        "/v1/completions",
    )
    assert isinstance(greedy, GenerateJob)
    assert greedy.do_sample is False and greedy.max_new_tokens == 5 and greedy.stop == ["."]


def test_chat_lines_carry_messages() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_completion_tokens": 7}
    _, job = parse_line(line("/v1/chat/completions", body), "/v1/chat/completions")
    assert isinstance(job, GenerateJob) and job.messages is not None and job.messages[0].content == "hello"
    assert job.max_new_tokens == 7


def test_extension_endpoints_map_to_their_job_types() -> None:
    cases = [
        ("/v1/fill-mask", {"model": "m", "input": "a [MASK]"}, FillMaskJob),
        ("/v1/translations", {"model": "m", "input": "hi", "max_tokens": 9}, TranslateJob),
        ("/v1/classifications", {"model": "m", "input": ["a", "b"]}, ClassifyJob),
        ("/v1/jobs", {"task": "classify", "model": "m", "text": "a"}, ClassifyJob),
    ]
    for url, body, kind in cases:
        assert isinstance(parse_line(line(url, body), url)[1], kind)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_request"),
        (json.dumps({"custom_id": "a", "method": "GET", "url": "/v1/jobs", "body": {}}).encode(), "invalid_request"),
        (line("/v1/completions", {"model": "m", "prompt": "x"}), "invalid_url"),
        (line("/v1/jobs", {"task": "generate", "model": "m", "prompt": "x", "max_new_tokens": -1}), "invalid_request"),
        (line("/v1/jobs", {"task": "generate", "model": "m", "prompt": "x", "stream": "maybe"}), "invalid_request"),
        (b"\xff\xfe not utf-8", "invalid_json"),
        pytest.param(
            b'{"custom_id": "deep", "body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json", id="too-deep"
        ),
    ],
)
def test_bad_lines_raise_line_errors(raw: bytes, code: str) -> None:
    with pytest.raises(LineError) as info:
        parse_line(raw, "/v1/jobs")
    assert info.value.code == code


def test_line_errors_name_the_body_field() -> None:
    with pytest.raises(LineError) as info:
        parse_line(line("/v1/jobs", {"task": "generate", "model": "m", "prompt": "x", "max_new_tokens": 0}), "/v1/jobs")
    assert info.value.param == "body.max_new_tokens" and info.value.custom_id == "r1"


def test_output_and_error_envelopes() -> None:
    result = GenerateResult(
        model="m",
        generations=[Generation(index=0, text=" there", token_ids=[1, 2], finish_reason="stop")],
        usage=Usage(prompt_tokens=3, completion_tokens=2),
    )
    out = output_line("r1", 200, response_body("/v1/completions", result, "m"))
    assert set(out) == {"id", "custom_id", "response", "error"} and out["error"] is None
    body = out["response"]["body"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == " there"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chat = response_body("/v1/chat/completions", result, "m")
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": " there", "refusal": None}

    http_err = error_line_for("r2", InputTooLong("too long", param="text"))
    assert (
        http_err["response"]["status_code"] == 422 and http_err["response"]["body"]["error"]["code"] == "input_too_long"
    )
    expired = error_line("r3", ErrorInfo(code="batch_expired", message="late"))
    assert expired["response"] is None and expired["error"] == {"code": "batch_expired", "message": "late"}
