"""translate, fill-mask and classify take what their transformers counterparts take, and answer the same.

translate: generate's decoding knobs (sampling with a seed, n, penalties, stop strings) and a target
language on a many-to-many model (the tiny M2M100), equal to ``model.generate`` token for token, jobs
batched together through the model's engine. fill-mask ``targets`` and classify ``text_pair`` and
``function_to_apply`` equal the pipelines.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel
from transformers import pipeline

from queueformer.contract.errors import InvalidInput
from queueformer.contract.registry import ModelEntry
from queueformer.contract.tasks import parse_job
from tests.model.conftest import reference
from workers.engine.item import WorkItem
from workers.holder import Served, serve

ENGLISH = ["the cat sleeps", "the weather is good", "the book is on the table", "i am hungry"]
GERMAN = ["die katze schläft", "das wetter ist gut"]


def entry(name: str, task: str, path: str) -> ModelEntry:
    return ModelEntry(name=name, task=task, path=path, device_map="cpu", max_batch_size=16)


SERVED = {
    "mt": ("translate", "tiny-marian-en-de"),
    "m2m": ("translate", "tiny-m2m"),
    "mlm": ("fill-mask", "tiny-bert"),
    "cls": ("classify", "tiny-sentiment"),
}


class Models(dict[str, Served]):
    """Each model loaded and served on first use, stopped at the end of the module."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Served:
        task, path = SERVED[name]
        self[name] = served = serve(entry(name, task, path), self.root)
        return served


@pytest.fixture(scope="module")
def models(tiny_models: Path) -> Iterator[Models]:
    served = Models(tiny_models)
    yield served
    for s in served.values():
        s.stop()


def run(served: Served, jobs: list[dict[str, Any]]) -> list[Any]:
    """Every job prepared as the worker does and submitted at once, so the engine batches what it may."""
    handler = served.handler
    prepared = [
        handler.preprocess(parse_job({"task": served.entry.task, "model": served.entry.name, **j})) for j in jobs
    ]
    items = [served.engine.submit(WorkItem(p)) for p in prepared]
    out = []
    for p, item in zip(prepared, items, strict=True):
        result = handler.postprocess(p, item.future.result(timeout=120))
        assert isinstance(result, BaseModel)
        out.append(result.model_dump())
    return out


def generate(model: Any, tok: Any, text: str, seed: int | None = None, **kwargs: Any) -> list[list[int]]:
    """Plain ``model.generate`` on one text; rows without the decoder start token, cut after EOS."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(**tok(text, return_tensors="pt"), **kwargs)
    rows = []
    for row in out.tolist():
        row = row[1:]
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id) + 1]
        rows.append(row)
    return rows


TRANSLATE_CASES: list[dict[str, Any]] = [
    {"max_new_tokens": 24, "repetition_penalty": 1.3},
    {"max_new_tokens": 24, "no_repeat_ngram_size": 2},
    {"max_new_tokens": 24, "num_beams": 3, "num_return_sequences": 2},
    {"max_new_tokens": 24, "do_sample": True, "temperature": 1.4, "top_k": 20, "seed": 7, "num_return_sequences": 3},
    {"max_new_tokens": 24, "do_sample": True, "top_p": 0.8, "seed": 11},
]


def test_translate_takes_generate_knobs_and_equals_generate_batched(models: Models, tiny_models: Path) -> None:
    model, tok = reference(models["mt"].entry, tiny_models)
    jobs = [{"text": t, **case} for case in TRANSLATE_CASES for t in ENGLISH[:2]]
    results = run(models["mt"], jobs)  # all at once: equal knobs share a generate call
    for job, result in zip(jobs, results, strict=True):
        knobs = {k: v for k, v in job.items() if k not in ("text", "seed")}
        want = generate(model, tok, job["text"], seed=job.get("seed"), **knobs)
        assert [t["token_ids"] for t in result["translations"]] == want, job
        assert result["translation"] == result["translations"][0]
        assert len(result["translations"]) == job.get("num_return_sequences", 1)
    again = run(models["mt"], [jobs[6], {"text": "i am hungry", "do_sample": True, "seed": 7}])[0]
    assert again == results[6]  # a seeded sampled job does not depend on its company


def test_translate_stop_strings_and_openai_penalties(models: Models, tiny_models: Path) -> None:
    model, tok = reference(models["mt"].entry, tiny_models)
    (free,) = run(models["mt"], [{"text": ENGLISH[0]}])
    words = free["translation"]["text"].split()
    assert len(words) >= 2
    (stopped,) = run(models["mt"], [{"text": ENGLISH[0], "stop": [words[1]]}])
    assert stopped["translation"]["text"] == free["translation"]["text"][: free["translation"]["text"].find(words[1])]
    want = generate(model, tok, ENGLISH[0], max_new_tokens=128, stop_strings=[words[1]], tokenizer=tok)
    assert stopped["translation"]["token_ids"] == want[0]
    (penalised,) = run(models["mt"], [{"text": ENGLISH[2], "frequency_penalty": 2.0, "presence_penalty": 1.0}])
    (plain,) = run(models["mt"], [{"text": ENGLISH[2]}])
    ids = plain["translation"]["token_ids"]
    repeats = len(ids) - len(set(ids))
    assert len(penalised["translation"]["token_ids"]) - len(set(penalised["translation"]["token_ids"])) <= repeats


def test_target_language_points_a_many_to_many_model(models: Models, tiny_models: Path) -> None:
    model, tok = reference(models["m2m"].entry, tiny_models)
    de, en = tok.convert_tokens_to_ids("__de__"), tok.convert_tokens_to_ids("__en__")
    jobs = [
        *({"text": t, "target_language": "de", "max_new_tokens": 32} for t in ENGLISH),
        *({"text": t, "target_language": "en", "max_new_tokens": 32} for t in GERMAN),
        {"text": ENGLISH[0], "forced_bos_token_id": de, "max_new_tokens": 32, "num_beams": 2},
    ]
    results = run(models["m2m"], jobs)
    for job, result in zip(jobs, results, strict=True):
        forced = {"de": de, "en": en}.get(job.get("target_language", ""), job.get("forced_bos_token_id"))
        kwargs = {"max_new_tokens": 32, "forced_bos_token_id": forced, "num_beams": job.get("num_beams", 1)}
        want = generate(model, tok, job["text"], **kwargs)[0]
        assert result["translation"]["token_ids"] == want and want[0] == forced
        assert "__" not in result["translation"]["text"]
    with pytest.raises(InvalidInput) as err:
        run(models["m2m"], [{"text": "x", "target_language": "xx_Klingon"}])
    assert err.value.param == "target_language"


def test_fill_mask_targets_match_the_pipeline(models: Models, tiny_models: Path) -> None:
    model, tok = reference(models["mlm"].entry, tiny_models)
    fill = pipeline("fill-mask", model=model, tokenizer=tok)
    cases = [
        ("The cat sleeps on the warm [MASK] in the afternoon.", ["bed", "floor", "sun", "table"], 3),
        ("The cat sleeps on the warm [MASK] in the afternoon.", "bed", 5),
        ("The [MASK] bridge crosses the [MASK].", ["old", "river", "new"], 2),
        ("A [MASK] holds jobs.", ["queue", "zzyzxq"], 5),  # a word that is no token stands for its first token
    ]
    results = run(models["mlm"], [{"text": t, "targets": g, "top_k": k} for t, g, k in cases])
    for (text, targets, k), result in zip(cases, results, strict=True):
        want = fill(text, targets=targets, top_k=k)
        want = [want] if isinstance(want[0], dict) else want
        for got_mask, want_mask in zip(result["masks"], want, strict=True):
            assert [c["token"] for c in got_mask] == [c["token"] for c in want_mask]
            assert [c["sequence"] for c in got_mask] == [c["sequence"] for c in want_mask]
            for g, w in zip(got_mask, want_mask, strict=True):
                assert g["score"] == pytest.approx(w["score"], abs=1e-6)


def test_classify_text_pairs_and_function_to_apply_match_the_pipeline(models: Models, tiny_models: Path) -> None:
    model, tok = reference(models["cls"].entry, tiny_models)
    classify = pipeline("text-classification", model=model, tokenizer=tok, top_k=None)
    pairs = [("I love this film", "it was wonderful"), ("bad", "the food was cold"), ("great", "awful and slow")]
    jobs: list[dict[str, Any]] = [
        {"text": [a for a, _ in pairs], "text_pair": [b for _, b in pairs], "top_k": None},
        *(
            {"text": a, "text_pair": b, "top_k": None, "function_to_apply": f}
            for a, b in pairs[:2]
            for f in ("sigmoid", "none")
        ),
        {"text": "I love this film", "top_k": None, "function_to_apply": "none"},
    ]
    results = run(models["cls"], jobs)

    def want(text: Any, function: str) -> dict[str, float]:
        return {x["label"]: x["score"] for x in classify(text, function_to_apply=function)[0]}

    for (a, b), labels in zip(pairs, results[0]["labels"], strict=True):
        got = {x["label"]: x["score"] for x in labels}
        expected = want([{"text": a, "text_pair": b}], "softmax")
        assert got.keys() == expected.keys() and all(got[k] == pytest.approx(expected[k], abs=1e-6) for k in got)
    for job, result in zip(jobs[1:], results[1:], strict=True):
        text = {"text": job["text"], "text_pair": job["text_pair"]} if "text_pair" in job else job["text"]
        expected = want([text], job["function_to_apply"])
        got = {x["label"]: x["score"] for x in result["labels"][0]}
        assert all(got[k] == pytest.approx(expected[k], abs=1e-6) for k in expected)
    assert any(s < 0 or s > 1 for s in want(["I love this film"], "none").values())  # raw logits really differ
    alone = run(models["cls"], [{"text": "I love this film", "top_k": None}])[0]["labels"][0]
    assert {x["label"] for x in alone} == set(want(["I love this film"], "softmax"))
