"""Structured output through the continuous-batching engine on the tiny GPT-2.

Constrained rows (different schemas, a regex, a choice) and free rows share batches, greedy and
sampled; every constrained output parses and validates, and the free rows decode exactly as they do
without company.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor

from queueformer.contract.errors import InvalidInput
from queueformer.contract.jobs import GenerateJob
from queueformer.contract.registry import ModelEntry
from workers.engine.constraint import Constraint, ConstraintSpec
from workers.engine.decode import GenOutput, GenRequest
from workers.engine.item import WorkItem
from workers.holder import Served, serve

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "summary": {"type": "string", "maxLength": 24},
        "sky": {"enum": ["sunny", "cloudy", "rain"]},
        "wind_kmh": {"type": "integer", "minimum": 0, "maximum": 150},
        "warm": {"type": "boolean"},
    },
    "required": ["summary", "sky", "wind_kmh", "warm"],
    "additionalProperties": False,
}
PATTERN = r"(yes|no), [0-9]{1,3} (cats|dogs)"
CHOICES = ["sunny", "cloudy", "a light wind from the west"]


@pytest.fixture(scope="module")
def gen(tiny_models: Path) -> Iterator[Served]:
    served = serve(
        ModelEntry(name="g", task="generate", path="tiny-gpt2", device_map="cpu", max_batch_size=16), tiny_models
    )
    yield served
    served.stop()


def request(served: Served, spec: ConstraintSpec | None = None, **job: Any) -> GenRequest:
    """What the generate handler builds for a job, with the compiled grammar of ``spec``."""
    prepared = served.handler.preprocess(GenerateJob(model="g", **job))
    if spec is None:
        return prepared
    return dataclasses.replace(prepared, constraint=served.handler.grammars.compile(spec))


def decode(served: Served, reqs: list[GenRequest]) -> list[list[GenOutput]]:
    items = [served.engine.submit(WorkItem(r)) for r in reqs]  # all at once: they share batches
    return [it.future.result(timeout=120) for it in items]


def text(served: Served, out: GenOutput) -> str:
    return served.handler.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def check(served: Served, spec: ConstraintSpec, outs: list[GenOutput]) -> None:
    for out in outs:
        assert out.finish_reason == "stop", (out, text(served, out))
        got = text(served, out)
        if spec.kind == "json_schema":
            jsonschema.validate(json.loads(got), json.loads(spec.schema or "{}"))
        elif spec.kind == "json_object":
            assert isinstance(json.loads(got), dict)
        elif spec.kind == "regex":
            assert re.fullmatch(spec.pattern or "", got), got
        else:
            assert got in spec.choices


# Specs whose every output is bounded, so each row must end with finish_reason "stop".
SPECS = [
    ConstraintSpec.json_schema(PERSON),
    ConstraintSpec.json_schema(WEATHER),
    ConstraintSpec.regex(PATTERN),
    ConstraintSpec.choice(CHOICES),
]
PROMPTS = ["The weather today", "A queue holds", "Record:", "Answer:"]


def check_json_object(served: Served, out: GenOutput) -> None:
    """Any JSON object: its strings are unbounded, so the tiny model may still be inside one at the cap."""
    got = text(served, out)
    assert got.startswith("{")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(got), dict)


def test_greedy_constrained_and_free_rows_share_a_batch(gen: Served) -> None:
    free = [request(gen, prompt=p, max_new_tokens=20) for p in ("The weather today", "A queue holds", "The cat")]
    alone = decode(gen, free)
    constrained = [request(gen, spec, prompt=p, max_new_tokens=200) for spec, p in zip(SPECS, PROMPTS, strict=True)]
    anything = request(gen, ConstraintSpec.json_object(), prompt="The cat sleeps on", max_new_tokens=60)
    mixed = decode(gen, [*constrained[:2], *free, anything, *constrained[2:]])
    for spec, outs in zip(SPECS, [*mixed[:2], *mixed[6:]], strict=True):
        check(gen, spec, outs)
    check_json_object(gen, mixed[5][0])
    assert [o[0].token_ids for o in mixed[2:5]] == [o[0].token_ids for o in alone]  # free rows undisturbed


def test_sampled_rows_with_penalties_and_warpers_all_validate(gen: Served) -> None:
    knobs = {"do_sample": True, "temperature": 1.3, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.2}
    reqs = [
        request(gen, spec, prompt=p, max_new_tokens=200, num_return_sequences=3, seed=i, **knobs)
        for i, (spec, p) in enumerate(zip(SPECS, PROMPTS, strict=True))
    ]
    anything = request(gen, ConstraintSpec.json_object(), prompt="Data:", max_new_tokens=60, seed=9, **knobs)
    free = request(gen, prompt="The weather today", max_new_tokens=24, do_sample=True, seed=5)
    (free_alone,) = decode(gen, [free])
    outs = decode(gen, [*reqs, anything, free])
    for spec, group in zip(SPECS, outs[: len(SPECS)], strict=True):
        assert len(group) == 3
        check(gen, spec, group)
    check_json_object(gen, outs[-2][0])
    assert outs[-1][0].token_ids == free_alone[0].token_ids  # seeded free row: the same with or without company
    again = decode(gen, reqs[:2])  # seeded constrained rows repeat too
    assert [[o.token_ids for o in g] for g in again] == [[o.token_ids for o in g] for g in outs[:2]]


class _Mask(LogitsProcessor):
    """The grammar as a logits processor for ``model.generate``: the engine-free reference."""

    def __init__(self, constraint: Constraint, prompt_len: int) -> None:
        self.constraint, self.prompt_len = constraint, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.prompt_len:
            assert self.constraint.accept(int(input_ids[0, -1]))
        return self.constraint.mask(scores.clone())  # type: ignore[return-value]


def test_greedy_constrained_output_equals_generate_under_the_same_mask(gen: Served) -> None:
    model = gen.handler.model
    for spec, prompt in zip(SPECS, PROMPTS, strict=True):
        req = request(gen, spec, prompt=prompt, max_new_tokens=200)
        engine = decode(gen, [req])[0]
        assert req.constraint is not None
        ids = torch.tensor([req.input_ids])
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=len(engine[0].token_ids) + 1,
                logits_processor=[_Mask(req.constraint.constraint(), ids.shape[1])],
            )
        ref = out[0, ids.shape[1] :].tolist()
        # The engine stops as soon as nothing but EOS may follow; generate spends one more step on it.
        assert ref[: len(engine[0].token_ids)] == engine[0].token_ids
        assert ref[len(engine[0].token_ids) :] in ([], [gen.handler.tokenizer.eos_token_id])


def test_rows_evicted_by_an_oom_restart_their_grammar(gen: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    reqs = [request(gen, spec, prompt=p, max_new_tokens=200) for spec, p in zip(SPECS, PROMPTS, strict=True)]
    want = [[o.token_ids for o in g] for g in decode(gen, reqs)]
    model = gen.handler.model
    real_forward = model.forward
    calls = {"decode": 0}

    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1 and ids.shape[0] > 1:
            calls["decode"] += 1
            if calls["decode"] == 6:  # mid-document: the newest half goes back to the queue
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    got = decode(gen, reqs)
    monkeypatch.undo()
    assert calls["decode"] > 6
    assert [[o.token_ids for o in g] for g in got] == want
    for spec, outs in zip(SPECS, got, strict=True):
        check(gen, spec, outs)


def test_a_constrained_request_never_takes_the_generate_path(gen: Served) -> None:
    req = request(gen, ConstraintSpec.json_object(), prompt="x", max_new_tokens=8)
    with pytest.raises(InvalidInput):
        gen.handler.hf_generate(req)
    with pytest.raises(InvalidInput, match="num_beams"):
        dataclasses.replace(req, generation=GenerationConfig(num_beams=2))
