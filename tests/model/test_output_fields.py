"""Generate job fields that shape the output, on the tiny GPT-2 through the continuous-batching engine.

Structured output (``json_schema``, ``regex``, ``choice``, ``response_format``) is asked for in the
job itself: every output parses and validates, constrained and free jobs share batches, and a schema
the grammar cannot enforce is refused naming the field. OpenAI's presence/frequency penalties and
logit bias (``sequence_bias`` of single tokens) are checked against a plain re-implementation of
OpenAI's formula over transformers' forward pass, alone and batched.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from queueformer.contract.errors import InvalidInput
from queueformer.contract.jobs import GenerateJob
from queueformer.contract.records import GenerateResult
from queueformer.contract.registry import ModelEntry
from workers.engine.item import WorkItem
from workers.holder import Served, serve

ITEM: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
    },
    "required": ["name", "count", "kind", "tags"],
    "additionalProperties": False,
}
SKY: dict[str, Any] = {
    "type": "object",
    "properties": {"sky": {"enum": ["sunny", "cloudy"]}, "warm": {"type": "boolean"}},
    "required": ["sky", "warm"],
    "additionalProperties": False,
}
PATTERN = r"(yes|no), [0-9]{1,2} (cats|dogs)"
CHOICES = ["sunny", "cloudy", "a light wind from the west"]


@pytest.fixture(scope="module")
def gen(tiny_models: Path) -> Iterator[Served]:
    served = serve(
        ModelEntry(name="g", task="generate", path="tiny-gpt2", device_map="cpu", max_batch_size=16), tiny_models
    )
    yield served
    served.stop()


def run(served: Served, jobs: list[dict[str, Any]]) -> list[GenerateResult]:
    """Preprocess every job as the worker does, submit them all at once (they share batches), postprocess."""
    handler = served.handler
    prepared = [handler.preprocess(GenerateJob(model="g", **job)) for job in jobs]
    items = [served.engine.submit(WorkItem(p)) for p in prepared]
    out = []
    for p, item in zip(prepared, items, strict=True):
        result = handler.postprocess(p, item.future.result(timeout=120))
        assert isinstance(result, GenerateResult)
        out.append(result)
    return out


def texts(result: GenerateResult) -> list[str]:
    return [g.text for g in result.generations]


CONSTRAINED: list[dict[str, Any]] = [
    {"prompt": "Record:", "json_schema": ITEM},
    {"prompt": "Answer:", "regex": PATTERN},
    {"prompt": "The weather today", "choice": CHOICES},
    {
        "prompt": "Sky:",
        "response_format": {"type": "json_schema", "json_schema": {"name": "sky", "schema": SKY, "strict": True}},
    },
    {
        "prompt": "Item:",
        "response_format": {"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM}},  # strict: false
    },
]


def check(job: dict[str, Any], result: GenerateResult) -> None:
    for g in result.generations:
        assert g.finish_reason == "stop", (job, g)
        if "json_schema" in job:
            jsonschema.validate(json.loads(g.text), job["json_schema"])
        elif "regex" in job:
            assert re.fullmatch(job["regex"], g.text), g.text
        elif "choice" in job:
            assert g.text in job["choice"]
        else:
            jsonschema.validate(json.loads(g.text), job["response_format"]["json_schema"]["schema"])


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_constrained_jobs_validate_and_share_batches_with_free_ones(gen: Served, sampled: bool) -> None:
    knobs: dict[str, Any] = {"do_sample": True, "temperature": 1.2, "num_return_sequences": 3} if sampled else {}
    free = [
        {"prompt": "The weather today", "max_new_tokens": 16, "seed": 3, **knobs},
        {"prompt": "A queue holds", "max_new_tokens": 16, "seed": 4, "response_format": {"type": "text"}, **knobs},
    ]
    alone = run(gen, free)
    constrained = [{**job, "max_new_tokens": 160, "seed": i, **knobs} for i, job in enumerate(CONSTRAINED)]
    anything = {"prompt": "Data:", "max_new_tokens": 40, "response_format": {"type": "json_object"}, **knobs}
    mixed = run(gen, [constrained[0], free[0], *constrained[1:3], anything, free[1], *constrained[3:]])
    got_free = [mixed[1], mixed[5]]
    got_constrained = [mixed[0], mixed[2], mixed[3], mixed[6], mixed[7]]
    for job, result in zip(constrained, got_constrained, strict=True):
        assert len(result.generations) == (3 if sampled else 1)
        check(job, result)
    for g in mixed[4].generations:  # any JSON object: unbounded strings may still be open at the cap
        assert g.text.startswith("{")
        if g.finish_reason == "stop":
            assert isinstance(json.loads(g.text), dict)
    assert [texts(r) for r in got_free] == [texts(r) for r in alone]  # free rows undisturbed by their company


@pytest.mark.parametrize(
    ("job", "param"),
    [
        ({"json_schema": {"type": "array", "uniqueItems": True}}, "json_schema"),
        ({"regex": "(?<=a)b"}, "regex"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}, "strict": True},
                }
            },
            "response_format.json_schema.schema",
        ),
    ],
)
def test_what_the_engine_cannot_enforce_is_refused_naming_the_field(
    gen: Served, job: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        gen.handler.preprocess(GenerateJob(model="g", prompt="x", **job))
    assert err.value.param == param and err.value.http_status == 422


# --- OpenAI penalties and logit bias ------------------------------------------------------------------


def reference(
    served: Served, prompt: str, steps: int, presence: float, frequency: float, bias: dict[int, float]
) -> list[int]:
    """Greedy decoding with OpenAI's formula written out: logit[j] - c[j]*frequency - (c[j]>0)*presence + bias[j],
    c counting the generated tokens only (EOS ignored). A full forward per step, no cache, no queueformer code."""
    model, tok = served.handler.model, served.handler.tokenizer
    ids = tok(prompt)["input_ids"]
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
        for token, c in Counter(out).items():
            logits[token] -= c * frequency + presence
        for token, b in bias.items():
            logits[token] += b
        out.append(int(torch.argmax(logits)))
    return out


def test_presence_and_frequency_penalties_and_logit_bias_follow_openai_alone_and_batched(gen: Served) -> None:
    tok = gen.handler.tokenizer
    prompt = "The weather today"
    plain = run(gen, [{"prompt": prompt, "max_new_tokens": 24, "ignore_eos": True}])[0].generations[0].token_ids
    banned = {plain[0]: -100.0, plain[2]: -100.0}
    forced = tok(" cat")["input_ids"][0]
    cases: list[tuple[float, float, dict[int, float]]] = [
        (0.0, 1.5, {}),
        (1.2, 0.0, {}),
        (0.6, 0.8, banned),
        (-1.0, -0.5, {}),
        (0.0, 0.0, {forced: 100.0}),
    ]
    jobs = [
        {
            "prompt": prompt,
            "max_new_tokens": 24,
            "ignore_eos": True,
            "presence_penalty": p,
            "frequency_penalty": f,
            **({"sequence_bias": [[[k], v] for k, v in b.items()]} if b else {}),
        }
        for p, f, b in cases
    ]
    want = [reference(gen, prompt, 24, p, f, b) for p, f, b in cases]
    alone = [run(gen, [job])[0].generations[0].token_ids for job in jobs]
    batched = [r.generations[0].token_ids for r in run(gen, [*jobs, {"prompt": "A queue holds"}])[:-1]]
    assert alone == want and batched == want
    assert want[0] != plain and want[1] != plain  # the penalties change the greedy output
    assert not set(banned) & set(want[2])
    assert set(want[4]) == {forced}
    # A frequency penalty of 1.5 spreads the output over more distinct tokens than no penalty.
    assert len(set(want[0])) > len(set(plain))
