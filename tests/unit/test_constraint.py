"""Structured output without a model: the tiny GPT-2's byte-level BPE tokenizer and hand-made logits.

Sampling from random logits through the mask lets the grammar pick any allowed token at every step,
which is a harsher test than a trained model: every finished output must still parse and validate.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import jsonschema
import pytest
import torch
from transformers import GenerationConfig

from queueformer.contract.errors import InternalError, InvalidInput
from workers.engine.constraint import Constraint, ConstraintSpec, Grammar, Grammars, apply_bitmask, mask_rows
from workers.engine.decode import GenRequest
from workers.tiny_models import bpe_tokenizer, corpus

EOS = 0  # <|endoftext|> in the tiny tokenizer

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"},
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
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
TREE: dict[str, Any] = {  # recursive, through $defs and anyOf
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "v": {"type": "integer", "minimum": 0, "maximum": 9},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
            },
            "required": ["v"],
            "additionalProperties": False,
        }
    },
    "anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}],
}
UNION: dict[str, Any] = {
    "type": "object",
    "properties": {
        "pet": {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["kind", "lives"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
                    "required": ["kind", "good"],
                    "additionalProperties": False,
                },
            ]
        },
        "count": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100},
    },
    "required": ["pet", "count"],
    "additionalProperties": False,
}


@cache
def tokenizer() -> Any:
    return bpe_tokenizer(corpus())  # the tiny GPT-2's tokenizer, trained in a fraction of a second


@cache
def grammars(width: int = 512) -> Grammars:
    return Grammars(tokenizer(), width=width, stop_ids=[EOS])


def allowed(c: Constraint, width: int = 512) -> set[int]:
    scores = torch.zeros(1, width)
    c.mask(scores)
    return set(torch.nonzero(scores[0] == 0).flatten().tolist())


def sample(grammar: Grammar, seed: int, max_tokens: int = 400, width: int = 512) -> tuple[list[int], bool]:
    """Tokens drawn from random logits through the mask, until the row must stop (or the cap)."""
    gen = torch.Generator().manual_seed(seed)
    c = grammar.constraint()
    tokens: list[int] = []
    for _ in range(max_tokens):
        scores = torch.randn(1, width, generator=gen)
        c.mask(scores)
        tok = int(torch.multinomial(torch.softmax(scores[0], -1), 1, generator=gen))
        assert c.accept(tok), f"the grammar refused token {tok}, which its own mask allowed"
        tokens.append(tok)
        if c.done:
            return tokens, True
    return tokens, False


def text_of(tokens: list[int]) -> str:
    return tokenizer().decode(tokens, skip_special_tokens=True)


def finished_texts(grammar: Grammar, samples: int, **kw: Any) -> list[str]:
    texts = [text_of(toks) for toks, done in (sample(grammar, seed, **kw) for seed in range(samples)) if done]
    assert len(texts) >= samples // 2, f"only {len(texts)} of {samples} samples finished"
    return texts


@pytest.mark.parametrize("schema", [PERSON, TREE, UNION], ids=["nested", "recursive", "union"])
def test_every_sampled_document_parses_and_validates(schema: dict[str, Any]) -> None:
    grammar = grammars().compile(ConstraintSpec.json_schema(schema))
    for text in finished_texts(grammar, 24):
        jsonschema.validate(json.loads(text), schema)
        assert text == json.dumps(
            json.loads(text), separators=(",", ":"), ensure_ascii=False
        )  # compact, no stray spaces


def test_json_object_outputs_are_json_objects() -> None:
    grammar = grammars().compile(ConstraintSpec.json_object())
    texts = finished_texts(grammar, 24, max_tokens=200)
    assert all(isinstance(json.loads(t), dict) for t in texts)


def test_regex_and_choice_outputs_match() -> None:
    pattern = r"(yes|no) [0-9]{2,4}"
    texts = finished_texts(grammars().compile(ConstraintSpec.regex(pattern)), 16)
    assert all(re.fullmatch(pattern, t) for t in texts)
    choices = ["red", "green", 'say "hi"\\', "grün 🎉", "re"]
    texts = finished_texts(grammars().compile(ConstraintSpec.choice(choices)), 32)
    assert set(texts) <= set(choices) and len(set(texts)) >= 3


def test_eos_is_allowed_exactly_where_the_grammar_may_end() -> None:
    tok = tokenizer()
    digits = grammars().compile(ConstraintSpec.regex("[0-9]+")).constraint()
    assert EOS not in allowed(digits)  # nothing yet: may not end
    assert digits.accept(tok.convert_tokens_to_ids("7"))
    assert EOS in allowed(digits) and not digits.done  # may end, or go on
    assert digits.accept(EOS) and digits.done  # EOS taken: the row stops

    choice = grammars().compile(ConstraintSpec.choice(["re", "red"])).constraint()
    for t in tok.encode("re"):
        assert choice.accept(t)
    assert EOS in allowed(choice) and not choice.done  # "re" may end here or become "red"
    assert choice.accept(tok.convert_tokens_to_ids("d"))
    assert choice.done  # "red": complete, nothing but EOS could follow, so the row stops without it

    obj = (
        grammars()
        .compile(
            ConstraintSpec.json_schema(
                {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}},
                    "required": ["a"],
                    "additionalProperties": False,
                }
            )
        )
        .constraint()
    )
    for t in tok.encode('{"a":12'):
        assert obj.accept(t)
        assert EOS not in allowed(obj)
    assert obj.accept(tok.convert_tokens_to_ids("}")) and obj.done


def test_padding_columns_and_a_tokenizer_wider_than_the_logits() -> None:
    wide = grammars(520).compile(ConstraintSpec.json_object()).constraint()
    scores = torch.zeros(1, 520)
    wide.mask(scores)
    assert torch.isinf(scores[0, 512:]).all()  # output-layer padding never comes out
    # Logits wider than the grammar's vocabulary: the extra columns are blocked as well.
    scores = torch.zeros(1, 530)
    mask_rows(scores, [grammars().compile(ConstraintSpec.json_object()).constraint()])
    assert torch.isinf(scores[0, 512:]).all() and (scores[0, :512] == 0).any()
    # A model whose logits are narrower than its tokenizer: ids past the width never reach the logits.
    narrow = Grammars(tokenizer(), width=500, stop_ids=[EOS]).compile(ConstraintSpec.choice(["red", "green"]))
    scores = torch.zeros(1, 500)
    narrow.constraint().mask(scores)
    assert scores.shape == (1, 500) and (scores[0] == 0).any()


def test_batched_masking_equals_one_row_at_a_time_and_skips_free_rows() -> None:
    g = grammars()
    specs = [
        ConstraintSpec.json_schema(PERSON),
        None,
        ConstraintSpec.regex("[a-z]+"),
        ConstraintSpec.json_object(),
        None,
    ]
    rows: list[Constraint | None] = [g.compile(s).constraint() if s else None for s in specs]
    first = rows[0]
    assert first is not None
    for t in tokenizer().encode('{"name":"Al'):
        assert first.accept(t)
    logits = torch.randn(5, 512, generator=torch.Generator().manual_seed(3))
    batched = logits.clone()
    mask_rows(batched, rows)
    for i, c in enumerate(rows):
        if c is None:
            assert torch.equal(batched[i], logits[i])
        else:
            assert torch.equal(batched[i : i + 1], c.mask(logits[i : i + 1].clone()))
    with torch.inference_mode():  # the engine's logits are inference tensors; masking works outside the mode
        frozen = torch.randn(2, 512)
    mask_rows(frozen, [None, rows[2]])
    assert torch.isinf(frozen[1]).any() and not torch.isinf(frozen[0]).any()


def test_apply_bitmask_blocks_zero_bits_on_cpu_and_through_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 2), dtype=torch.int32, generator=gen)
    bits = [[(int(bitmask[r, t // 32]) >> (t % 32)) & 1 if t < 64 else 0 for t in range(70)] for r in range(3)]
    want = torch.tensor(bits) == 0  # a 0 bit, or past the bitmask: blocked
    for dtype in (torch.float32, torch.bfloat16):  # bfloat16 goes through the torch path
        logits = torch.zeros(3, 70, dtype=dtype)
        apply_bitmask(logits, bitmask, [0, 2])
        assert torch.equal(torch.isinf(logits[[0, 2]]), want[[0, 2]]) and not torch.isinf(logits[1]).any()


def test_reset_starts_the_grammar_over() -> None:
    c = grammars().compile(ConstraintSpec.json_schema(PERSON)).constraint()
    start = allowed(c)
    for t in tokenizer().encode('{"name":"Bo","age":4'):
        assert c.accept(t)
    assert allowed(c) != start
    c.reset()
    assert allowed(c) == start and not c.done


def test_a_token_outside_the_grammar_is_refused_and_explained() -> None:
    c = grammars().compile(ConstraintSpec.regex("[0-9]+")).constraint()
    assert not c.accept(tokenizer().convert_tokens_to_ids("x"))
    assert c.done
    assert isinstance(c.failure(5), InternalError)


def test_specs_compile_once_whatever_their_spelling() -> None:
    g = Grammars(tokenizer(), width=512, stop_ids=[EOS], cache_size=2)
    a = g.compile(ConstraintSpec.json_schema(PERSON))
    assert g.compile(ConstraintSpec.json_schema(json.dumps(PERSON, indent=2))) is a
    # Key order is part of the spec: properties come out in the order the schema lists them.
    reordered = {**PERSON, "properties": dict(reversed(list(PERSON["properties"].items())))}
    assert g.compile(ConstraintSpec.json_schema(reordered)) is not a
    assert g.compile(ConstraintSpec.json_schema(PERSON, strict=False)) is not a
    g.compile(ConstraintSpec.regex("a+"))
    g.compile(ConstraintSpec.regex("b+"))  # the cache holds two: PERSON is evicted
    assert g.compile(ConstraintSpec.json_schema(PERSON)) is not a
    assert g.compile.cache_info().maxsize == 2


@pytest.mark.parametrize(
    ("spec", "param", "words"),
    [
        (lambda: ConstraintSpec.json_schema("{not json"), "json_schema", "not valid JSON"),
        (lambda: ConstraintSpec.json_schema("[1, 2]"), "json_schema", "must be a JSON object"),
        (lambda: ConstraintSpec.json_schema({"type": "objekt"}), "json_schema", "objekt"),
        (lambda: ConstraintSpec.json_schema({"type": "array", "uniqueItems": True}), "json_schema", "uniqueItems"),
        (lambda: ConstraintSpec.json_schema({"not": {"type": "string"}}), "json_schema", "not"),
        (lambda: ConstraintSpec.json_schema({"$ref": "https://example.com/s.json"}), "json_schema", "example.com"),
        (
            lambda: ConstraintSpec.json_schema(
                {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}},
                    "required": ["a"],
                    "additionalProperties": False,
                    "minProperties": 2,
                }
            ),
            "json_schema",
            "Unsatisfiable",
        ),
        (
            lambda: ConstraintSpec.json_schema(
                {
                    "type": "object",
                    "properties": {"x": {"type": "integer"}},
                    "required": ["y"],
                    "additionalProperties": False,
                }
            ),
            "json_schema",
            "'y'",
        ),
        (lambda: ConstraintSpec.regex("(?<=a)b"), "regex", "look-around"),
        (
            lambda: ConstraintSpec.json_schema({"type": "string", "format": "no-such-format"}, param="response_format"),
            "response_format",
            "format",
        ),
        (lambda: ConstraintSpec.regex("a(b"), "regex", "unclosed"),
        (lambda: ConstraintSpec.regex(""), "regex", "empty"),
        (lambda: ConstraintSpec.choice([]), "choice", "at least one"),
    ],
)
def test_a_spec_the_library_refuses_is_invalid_input_naming_the_field(spec: Any, param: str, words: str) -> None:
    with pytest.raises(InvalidInput) as err:
        grammars().compile(spec())
    assert err.value.param == param and words in err.value.message
    assert err.value.http_status == 422


def test_a_non_strict_schema_enforces_what_it_can_and_ignores_the_rest() -> None:
    schema = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "maxItems": 4,
        "uniqueItems": True,
    }
    with pytest.raises(InvalidInput):
        grammars().compile(ConstraintSpec.json_schema(schema))
    lenient = grammars().compile(ConstraintSpec.json_schema(schema, strict=False))
    for text in finished_texts(lenient, 12):
        value = json.loads(text)
        assert isinstance(value, list) and len(value) <= 4 and all(0 <= v <= 9 for v in value)


def test_a_model_without_eos_cannot_take_constraints() -> None:
    with pytest.raises(InvalidInput, match="end-of-sequence"):
        Grammars(tokenizer(), width=512, stop_ids=[]).compile(ConstraintSpec.json_object())


def test_beam_search_with_a_constraint_is_refused_when_the_request_is_built() -> None:
    grammar = grammars().compile(ConstraintSpec.json_object())
    with pytest.raises(InvalidInput) as err:
        GenRequest(input_ids=(1, 2), max_new_tokens=8, generation=GenerationConfig(num_beams=2), constraint=grammar)
    assert err.value.param == "response_format"
    assert GenRequest(input_ids=(1, 2), max_new_tokens=8, constraint=grammar).constraint is grammar
