"""The job contract: every field bounded, limits configurable, errors name the field."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from queueformer.contract import limits
from queueformer.contract.errors import InputTooLong
from queueformer.contract.ids import valid_object_id
from queueformer.contract.jobs import ClassifyJob, FineTuneJob, GenerateJob, check_fits
from queueformer.contract.limits import Limits
from queueformer.contract.tasks import estimate_tokens, parse_job


@pytest.fixture(autouse=True)
def default_limits() -> Iterator[None]:
    limits.install(Limits())
    yield
    limits.install(Limits())


def error_locs(data: dict) -> list[tuple]:
    with pytest.raises(ValidationError) as info:
        parse_job(data)
    return [e["loc"] for e in info.value.errors()]


def test_each_job_type_parses_through_the_discriminated_union() -> None:
    bodies = [
        {"task": "generate", "model": "m", "prompt": "hi", "max_new_tokens": 4, "stop": "."},
        {"task": "fill-mask", "model": "m", "text": "a [MASK] b"},
        {"task": "translate", "model": "m", "text": "hello", "num_beams": 2},
        {"task": "classify", "model": "m", "text": ["a", "b"], "top_k": None},
        {"task": "fine-tune", "model": "m", "training_file": "file-0123456789abcdef", "method": "qlora"},
        {"task": "echo", "model": "echo", "text": "x"},
    ]
    parsed = [parse_job(b) for b in bodies]
    assert [p.task for p in parsed] == ["generate", "fill-mask", "translate", "classify", "fine-tune", "echo"]
    assert parsed[0].stop == ["."]
    assert isinstance(parsed[3], ClassifyJob) and parsed[3].texts == ["a", "b"]
    assert isinstance(parsed[4], FineTuneJob) and parsed[4].hyperparameters.block_size == 128


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10**6}, "max_new_tokens"),
        ({"temperature": 0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"num_beams": 0}, "num_beams"),
        ({"repetition_penalty": -1}, "repetition_penalty"),
        ({"stop": ["x"] * 50}, "stop"),
        ({"seed": -1}, "seed"),
        ({"prompt": 5}, "prompt"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"choice": []}, "choice"),
        ({"regex": ""}, "regex"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}, "name"),
        ({"response_format": {"type": "xml"}}, "type"),
    ],
)
def test_invalid_generate_fields_are_named(body: dict, field: str) -> None:
    locs = error_locs({"task": "generate", "model": "m", "prompt": "hi", **body})
    assert any(field in loc for loc in locs), locs


def test_unknown_task_is_refused_naming_the_tag() -> None:
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        parse_job({"task": "summarize", "model": "m"})


def test_configurable_limits_apply_at_validation_time() -> None:
    job = {"task": "generate", "model": "m", "prompt": "hi", "max_new_tokens": 600}
    parse_job(job)
    limits.install(Limits(max_new_tokens=512, max_prompt_chars=10))
    with pytest.raises(ValidationError, match=r"limits\.max_new_tokens"):
        parse_job(job)
    with pytest.raises(ValidationError, match=r"limits\.max_prompt_chars"):
        parse_job({"task": "echo", "model": "echo", "text": "x" * 11})


def test_texts_with_nul_and_oversized_lists_are_refused() -> None:
    assert ("echo", "text") in error_locs({"task": "echo", "model": "e", "text": "a\x00b"})
    limits.install(Limits(max_texts_per_job=2))
    locs = error_locs({"task": "classify", "model": "m", "text": ["a", "b", "c"]})
    assert any("text" in loc for loc in locs)


def test_greedy_search_cannot_return_several_sequences() -> None:
    with pytest.raises(ValidationError, match="num_return_sequences"):
        parse_job({"task": "generate", "model": "m", "prompt": "x", "num_return_sequences": 2, "do_sample": False})
    assert parse_job({"task": "generate", "model": "m", "prompt": "x", "num_return_sequences": 2, "do_sample": True})
    assert parse_job({"task": "generate", "model": "m", "prompt": "x", "num_return_sequences": 2, "num_beams": 2})


def test_prompt_and_messages_are_exclusive() -> None:
    chat = {"task": "generate", "model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert isinstance(parse_job(chat), GenerateJob)
    with pytest.raises(ValidationError, match="either prompt or messages"):
        parse_job({**chat, "prompt": "also"})


def test_model_names_cannot_carry_paths() -> None:
    assert ("generate", "model") in error_locs({"task": "generate", "model": "../etc/passwd", "prompt": "x"})
    assert parse_job({"task": "generate", "model": "Helsinki-NLP/opus-mt-en-de", "prompt": "x"})


def test_metadata_is_bounded() -> None:
    limits.install(Limits(max_metadata_pairs=2))
    locs = error_locs({"task": "echo", "model": "e", "metadata": {"a": "1", "b": "2", "c": "3"}})
    assert ("echo", "metadata") in locs


def test_object_ids_are_letters_and_digits_only() -> None:
    assert valid_object_id("job-0123456789abcdef")
    assert valid_object_id("batch_0123456789abcdef")
    for bad in ("job-../../etc", "job-short", "../file-0123456789", "file-0123456789abcdef/x", ""):
        assert not valid_object_id(bad)


def test_token_estimate_counts_prompt_and_new_tokens() -> None:
    job = parse_job({"task": "generate", "model": "m", "prompt": "x" * 400, "max_new_tokens": 50})
    assert estimate_tokens(job) == 100 + 1 + 50


def test_check_fits_refuses_max_new_tokens_that_leave_no_room_for_a_prompt() -> None:
    job = parse_job({"task": "generate", "model": "m", "prompt": "hi", "max_new_tokens": 255})
    check_fits(job, 256)  # one position left for the prompt
    check_fits(job, None)  # unknown window: the worker decides
    check_fits(parse_job({"task": "echo", "model": "m", "text": "x" * 500}), 8)  # not a decoder job
    with pytest.raises(InputTooLong) as info:
        check_fits(job.model_copy(update={"max_new_tokens": 256}), 256, "jobs.3.max_new_tokens")
    assert info.value.param == "jobs.3.max_new_tokens" and info.value.http_status == 422


def test_one_output_constraint_per_job_and_no_beams_with_it() -> None:
    base = {"task": "generate", "model": "m", "prompt": "x"}
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}, "strict": True}}
    job = parse_job({**base, "response_format": fmt})
    assert isinstance(job, GenerateJob) and job.constrained == "response_format"
    assert parse_job(job.model_dump(mode="json")) == job  # the schema survives the wire under its own name
    text = parse_job({**base, "response_format": {"type": "text"}})
    assert isinstance(text, GenerateJob) and text.constrained is None
    with pytest.raises(ValidationError, match="at most one of"):
        parse_job({**base, "regex": "a+", "choice": ["a"]})
    with pytest.raises(ValidationError, match="num_beams"):
        parse_job({**base, "json_schema": {"type": "object"}, "num_beams": 2})
