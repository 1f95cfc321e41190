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


def test_openai_parameters_map_onto_the_generate_job() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
        ],
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "logit_bias": {"17": -100, "3": 2.5},
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}},
        "n": 3,
        "seed": 11,
        "stop": ["\n", "END"],
        "max_completion_tokens": 40,
        "stream": False,
        "stream_options": None,
    }
    _, job = parse_line(line("/v1/chat/completions", body), "/v1/chat/completions")
    assert isinstance(job, GenerateJob) and job.messages is not None
    assert [m.content for m in job.messages] == ["Be brief.", "Hello\nthere"]
    assert (job.presence_penalty, job.frequency_penalty) == (0.5, -0.25)
    assert job.sequence_bias == [([17], -100.0), ([3], 2.5)]
    assert job.response_format is not None and job.response_format.json_schema is not None
    assert job.response_format.json_schema.schema_ == schema and job.response_format.json_schema.strict is True
    assert (job.num_return_sequences, job.seed, job.stop, job.max_new_tokens) == (3, 11, ["\n", "END"], 40)
    assert job.do_sample is True and job.constrained == "response_format"
    completion = {"model": "m", "prompt": "x", "temperature": 0, "best_of": 4, "suffix": "", "presence_penalty": 0}
    _, greedy = parse_line(line("/v1/completions", completion), "/v1/completions")
    assert isinstance(greedy, GenerateJob) and greedy.do_sample is False and greedy.num_return_sequences == 1
    json_mode = {"model": "m", "prompt": "x", "response_format": {"type": "json_object"}, "n": 2, "best_of": 2}
    _, obj = parse_line(line("/v1/completions", json_mode), "/v1/completions")
    assert isinstance(obj, GenerateJob) and obj.constrained == "response_format"


@pytest.mark.parametrize(
    ("url", "extra", "param"),
    [
        ("/v1/completions", {"echo_all": True}, "body.echo_all"),
        ("/v1/completions", {"suffix": "tail"}, "body.suffix"),
        ("/v1/completions", {"best_of": 3}, "body.best_of"),
        ("/v1/completions", {"n": 3, "best_of": 2}, "body.best_of"),
        ("/v1/completions", {"stream_options": {"include_usage": True}}, "body.stream_options"),
        ("/v1/completions", {"stream": True}, "body.stream"),
        ("/v1/completions", {"presence_penalty": 2.5}, "body.presence_penalty"),
        ("/v1/completions", {"logit_bias": {"abc": 1}}, "body.logit_bias"),
        ("/v1/completions", {"logit_bias": {"5": 200}}, "body.logit_bias"),
        ("/v1/completions", {"response_format": {"type": "yaml"}}, "body.response_format.type"),
        (
            "/v1/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": 1.5}}},
            "body.response_format.json_schema.strict",
        ),
        ("/v1/chat/completions", {"tools": []}, "body.tools"),
        ("/v1/chat/completions", {"suffix": ""}, "body.suffix"),
    ],
)
def test_fields_outside_openai_semantics_are_named_exactly(url: str, extra: dict, param: str) -> None:
    body = {
        "model": "m",
        **({"prompt": "x"} if url == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}),
    }
    with pytest.raises(LineError) as info:
        parse_line(line(url, {**body, **extra}), url)
    assert info.value.param == param and info.value.message.startswith(param), info.value.message


def test_chat_content_parts_other_than_text_are_refused_naming_the_part() -> None:
    parts = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
    body = {"model": "m", "messages": [{"role": "user", "content": parts}]}
    with pytest.raises(LineError) as info:
        parse_line(line("/v1/chat/completions", body), "/v1/chat/completions")
    assert info.value.param == "body.messages.0.content" and "part 1 has type 'image_url'" in info.value.message


def test_logprobs_and_echo_map_to_the_job_and_render_in_openai_shapes() -> None:
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    from queueformer.contract.records import TokenLogprob, TopLogprob

    _, job = parse_line(
        line("/v1/completions", {"model": "m", "prompt": "Hi", "logprobs": 2, "echo": True}), "/v1/completions"
    )
    assert isinstance(job, GenerateJob) and (job.logprobs, job.top_logprobs, job.prompt_logprobs) == (True, 2, True)
    chat_body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 3}
    _, chat_job = parse_line(line("/v1/chat/completions", chat_body), "/v1/chat/completions")
    assert isinstance(chat_job, GenerateJob) and (chat_job.logprobs, chat_job.top_logprobs) == (True, 3)
    with pytest.raises(LineError) as info:
        parse_line(line("/v1/chat/completions", {**chat_body, "logprobs": False}), "/v1/chat/completions")
    assert info.value.param == "body"

    def tok(i: int, text: str, lp: float | None, top: list[tuple[int, str, float]]) -> TokenLogprob:
        return TokenLogprob(
            token_id=i,
            token=text,
            logprob=lp,
            top_logprobs=[TopLogprob(token_id=a, token=b, logprob=c) for a, b, c in top],
        )

    result = GenerateResult(
        model="m",
        generations=[
            Generation(
                index=0,
                text=" thé",
                token_ids=[5, 6],
                finish_reason="length",
                logprobs=[
                    tok(5, " th", -0.5, [(5, " th", -0.5), (9, " a", -1.5)]),
                    tok(6, "é", -0.25, [(6, "é", -0.25)]),
                ],
            )
        ],
        prompt_logprobs=[tok(1, "H", None, []), tok(2, "i", -3.0, [(2, "i", -3.0)])],
        usage=Usage(prompt_tokens=2, completion_tokens=2),
    )
    request = {"model": "m", "prompt": "Hi", "logprobs": 2, "echo": True}
    # As OpenAI answers echo: the first prompt token has null where a log-probability would be.
    choice = response_body("/v1/completions", result, "m", request)["choices"][0]
    assert choice["text"] == "Hi thé"
    assert choice["logprobs"] == {
        "tokens": ["H", "i", " th", "é"],
        "token_logprobs": [None, -3.0, -0.5, -0.25],
        "top_logprobs": [None, {"i": -3.0}, {" th": -0.5, " a": -1.5}, {"é": -0.25}],
        "text_offset": [0, 1, 2, 5],
    }
    plain = Completion.model_validate(response_body("/v1/completions", result, "m", {**request, "echo": False}))
    assert plain.choices[0].text == " thé" and plain.choices[0].logprobs is not None
    assert plain.choices[0].logprobs.tokens == [" th", "é"] and plain.choices[0].logprobs.text_offset == [2, 5]
    chat = ChatCompletion.model_validate(response_body("/v1/chat/completions", result, "m", chat_body))
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and [c.token for c in content] == [" th", "é"]
    assert content[1].bytes == [195, 169] and [t.token for t in content[0].top_logprobs] == [" th", " a"]


def test_native_urls_carry_the_parity_fields() -> None:
    body = {"model": "m", "input": "hi", "n": 2, "do_sample": True, "seed": 4, "stop": ".", "target_language": "de"}
    _, tr = parse_line(line("/v1/translations", body), "/v1/translations")
    assert isinstance(tr, TranslateJob)
    assert (tr.num_return_sequences, tr.do_sample, tr.seed, tr.stop, tr.target_language) == (2, True, 4, ["."], "de")
    _, fm = parse_line(line("/v1/fill-mask", {"model": "m", "input": "a [MASK]", "targets": ["x"]}), "/v1/fill-mask")
    assert isinstance(fm, FillMaskJob) and fm.targets == ["x"]
    pair = {"model": "m", "input": ["a", "b"], "text_pair": ["c", "d"], "function_to_apply": "sigmoid"}
    _, cl = parse_line(line("/v1/classifications", pair), "/v1/classifications")
    assert isinstance(cl, ClassifyJob) and cl.pairs == ["c", "d"] and cl.function_to_apply == "sigmoid"
    with pytest.raises(LineError) as info:
        parse_line(line("/v1/classifications", {**pair, "text_pair": ["c"]}), "/v1/classifications")
    assert "text_pair has 1 entries for 2 texts" in info.value.message
