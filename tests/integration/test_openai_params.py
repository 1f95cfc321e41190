"""An OpenAI batch file using penalties, logit bias, response_format and content parts, through the openai SDK.

The lines are what an OpenAI user sends; the SDK uploads them, creates and polls the batch and reads
the output and error files from a real cluster (uvicorn API, a Celery worker, the tiny models). Every
response parses as the SDK's own ``ChatCompletion``/``Completion``; structured outputs validate.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion
from transformers import AutoTokenizer

from queueformer.server.cluster import Cluster
from tests.conftest import free_port
from tests.helpers import jsonl, make_settings

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def cluster(module_redis_url: str, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    c = Cluster(make_settings(module_redis_url, tmp, tiny_models), api_port=free_port(), worker_concurrency=8)
    with c.running(timeout=240):
        yield c


def run_batch(client: openai.OpenAI, endpoint: str, bodies: dict[str, dict[str, Any]], tmp: Path) -> tuple[dict, dict]:
    """Upload one batch file, wait for it, return (output lines, error lines) by custom_id."""
    path = tmp / "batch.jsonl"
    path.write_bytes(jsonl([{"custom_id": k, "method": "POST", "url": endpoint, "body": b} for k, b in bodies.items()]))
    file = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    deadline = time.monotonic() + 180
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.3)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch

    def read(file_id: str | None) -> dict[str, Any]:
        if not file_id:
            return {}
        lines = [json.loads(x) for x in client.files.content(file_id).text.splitlines()]
        return {x["custom_id"]: x for x in lines}

    return read(batch.output_file_id), read(batch.error_file_id)


def test_chat_batch_with_penalties_response_format_and_content_parts(cluster: Cluster, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=f"{cluster.api_url}/v1", api_key="unused-locally")
    user = [{"type": "text", "text": "Describe a person"}, {"type": "text", "text": "as JSON."}]
    base = {"model": "tiny-gpt2", "max_completion_tokens": 120}
    bodies: dict[str, dict[str, Any]] = {
        "schema": {
            **base,
            "messages": [{"role": "system", "content": "You write JSON."}, {"role": "user", "content": user}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON, "strict": True},
            },
            "temperature": 0.9,
            "n": 2,
            "seed": 5,
            "presence_penalty": 0.4,
            "frequency_penalty": 0.3,
        },
        "object": {
            **base,
            "messages": [{"role": "user", "content": user}],
            "response_format": {"type": "json_object"},
            "temperature": 0,
            "max_completion_tokens": 40,
        },
        "penalised": {
            **base,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "The weather today"}]}],
            "temperature": 0,
            "frequency_penalty": 1.5,
            "presence_penalty": 0.5,
            "logit_bias": {"0": -100},  # the end-of-text token: never chosen
            "max_completion_tokens": 12,
            "stop": ["\n"],
            "response_format": {"type": "text"},
            "logprobs": True,
            "top_logprobs": 2,
        },
        "unenforceable": {
            **base,
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "u", "schema": {"type": "array", "uniqueItems": True}, "strict": True},
            },
        },
        "unknown": {**base, "messages": [{"role": "user", "content": "x"}], "parallel_tool_calls": True},
    }
    out, err = run_batch(client, "/v1/chat/completions", bodies, tmp_path)
    assert sorted(out) == ["object", "penalised", "schema"] and sorted(err) == ["unenforceable", "unknown"]

    chats = {k: ChatCompletion.model_validate(v["response"]["body"]) for k, v in out.items()}
    assert len(chats["schema"].choices) == 2
    for choice in chats["schema"].choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), PERSON)
    obj = chats["object"].choices[0]
    assert (obj.message.content or "").startswith("{")
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.message.content or ""), dict)
    penalised = chats["penalised"].choices[0]
    assert penalised.finish_reason == "length" and chats["penalised"].usage is not None
    assert chats["penalised"].usage.completion_tokens == 12
    content = penalised.logprobs.content if penalised.logprobs else None
    assert content is not None and len(content) == 12
    assert "".join(c.token for c in content) == penalised.message.content
    for c in content:  # greedy: the chosen token is the likeliest one
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token and c.logprob <= 0

    refused = err["unenforceable"]["response"]
    assert refused["status_code"] == 422
    assert refused["body"]["error"]["param"] == "response_format.json_schema.schema"
    assert "uniqueItems" in refused["body"]["error"]["message"]
    unknown = err["unknown"]["response"]
    assert unknown["status_code"] == 400 and unknown["body"]["error"]["param"] == "body.parallel_tool_calls"


def test_completions_batch_with_openai_sampling_fields(cluster: Cluster, tmp_path: Path, tiny_models: Path) -> None:
    client = openai.OpenAI(base_url=f"{cluster.api_url}/v1", api_key="unused-locally")
    banned = AutoTokenizer.from_pretrained(tiny_models / "tiny-gpt2")(" is")["input_ids"]
    assert len(banned) == 1
    base = {"model": "tiny-gpt2", "prompt": "The weather today", "max_tokens": 10}
    bodies: dict[str, dict[str, Any]] = {
        "greedy": {**base, "temperature": 0, "best_of": 3, "suffix": None, "stream": False, "stream_options": None},
        "penalised": {
            **base,
            "temperature": 0,
            "presence_penalty": 2,
            "frequency_penalty": 2,
            "logit_bias": {"0": -100},
        },
        "banned": {**base, "temperature": 0, "logit_bias": {str(banned[0]): -100}},
        "sampled": {**base, "n": 3, "best_of": 3, "seed": 9, "top_p": 0.9, "stop": "."},
        "regex": {**base, "temperature": 0, "extra_body_is_not_a_field": 1},
        "insert": {**base, "suffix": " and then rain."},
    }
    out, err = run_batch(client, "/v1/completions", bodies, tmp_path)
    assert sorted(out) == ["banned", "greedy", "penalised", "sampled"] and sorted(err) == ["insert", "regex"]
    echoed, _ = run_batch(
        client, "/v1/completions", {"echo": {**base, "temperature": 0, "logprobs": 3, "echo": True}}, tmp_path
    )
    out.update(echoed)
    done = {k: Completion.model_validate(v["response"]["body"]) for k, v in out.items() if k != "echo"}
    assert done["greedy"].choices[0].text.startswith(" is sunny")
    assert not done["banned"].choices[0].text.startswith(" is")  # logit_bias -100: greedy never picks it
    echo = out["echo"]["response"]["body"]["choices"][0]  # raw: the first echoed token has a null logprob
    assert echo["text"] == base["prompt"] + done["greedy"].choices[0].text
    logprobs = echo["logprobs"]
    assert "".join(logprobs["tokens"]) == echo["text"] and logprobs["token_logprobs"][0] is None
    assert all(lp <= 0 for lp in logprobs["token_logprobs"][1:]) and logprobs["text_offset"][0] == 0
    assert all(len(top) <= 3 for top in logprobs["top_logprobs"][1:])
    assert done["penalised"].choices[0].finish_reason == "length"  # penalties and logit_bias accepted and run
    assert len(done["sampled"].choices) == 3 and all("." not in c.text for c in done["sampled"].choices)
    assert err["regex"]["response"]["body"]["error"]["param"] == "body.extra_body_is_not_a_field"
    assert err["insert"]["response"]["body"]["error"]["param"] == "body.suffix"
