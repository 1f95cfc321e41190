"""Every decoding field of a generate job decodes as ``model.generate`` does, alone and mixed in one batch.

The job's fields merge over the model's generation config and the continuous-batching engine builds each
row's processors with transformers' own builders, so the engine's tokens equal ``generate``'s (seeded
sampling included: the first sequence draws as ``torch.manual_seed(seed)`` then ``generate`` draws), and
a model whose ``generation_config.json`` carries a processor field decodes the same through the engine
and through beam search. Log-probabilities are the log-softmax of the very scores a token was chosen from.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from queueformer.contract.errors import InvalidInput
from queueformer.contract.jobs import GenerateJob
from queueformer.contract.records import GenerateResult
from queueformer.contract.registry import ModelEntry
from workers.engine.item import WorkItem
from workers.holder import Served, serve

PROMPTS = [
    "The weather today",
    "The weather today is sunny with a light wind from the west. The weather today",
    "A queue holds jobs until",
    "x",
    "The old bridge crosses the river near the village",
]
NEW = 20


@pytest.fixture(scope="module")
def gen(tiny_models: Path) -> Iterator[Served]:
    served = serve(
        ModelEntry(name="g", task="generate", path="tiny-gpt2", device_map="cpu", max_batch_size=128), tiny_models
    )
    yield served
    served.stop()


def reference(served: Served, prompt: str, seed: int | None = None, **kwargs: Any) -> list[int]:
    tok, model = served.handler.tokenizer, served.handler.model
    ids = tok(prompt, return_tensors="pt")
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=NEW, **kwargs)
    return list(out[0, ids["input_ids"].shape[1] :].tolist())


def submit(served: Served, **job: Any) -> WorkItem:
    return served.engine.submit(WorkItem(served.handler.preprocess(GenerateJob(model="g", **job))))


def result(served: Served, item: WorkItem) -> GenerateResult:
    return served.handler.postprocess(item.prepared, item.future.result(timeout=120))


def tokens(served: Served, item: WorkItem) -> list[int]:
    return list(item.future.result(timeout=120)[0].token_ids)


def cases(served: Served) -> list[dict[str, Any]]:
    """One case per field, with values that change the output of the tiny model on some prompt."""
    plain = reference(served, PROMPTS[0])
    frequent = plain[3]
    return [
        {"no_repeat_ngram_size": 2},
        {"min_new_tokens": 12, "eos_token_id": frequent},
        {"eos_token_id": [frequent, plain[6]]},
        {"bad_words_ids": [[plain[0]], [plain[1], plain[2]]]},
        {"suppress_tokens": [plain[0], plain[1]]},
        {"sequence_bias": [[[plain[0]], -50.0], [[plain[1], plain[2]], -50.0]]},
        {"repetition_penalty": 1.5, "no_repeat_ngram_size": 3},
        {"do_sample": True, "temperature": 3.0, "typical_p": 0.6, "seed": 3},
        {"do_sample": True, "temperature": 3.0, "min_p": 0.05, "seed": 4},
        {"do_sample": True, "temperature": 3.0, "top_k": 8, "top_p": 0.9, "seed": 5},
        {"num_beams": 3, "length_penalty": -2.0, "early_stopping": True},
        {"num_beams": 3, "length_penalty": 2.0, "early_stopping": "never", "no_repeat_ngram_size": 2},
    ]


def test_each_field_matches_generate_alone_and_mixed_in_one_batch(gen: Served) -> None:
    plain = {p: reference(gen, p) for p in PROMPTS}
    wants = []
    for case in cases(gen):
        fields = {k: v for k, v in case.items() if k != "seed"}
        want = {p: reference(gen, p, seed=case.get("seed"), **fields) for p in PROMPTS}
        assert any(want[p] != plain[p] for p in PROMPTS), f"{case} changes nothing on these prompts"
        for p in PROMPTS[:2]:  # alone: nothing else in the engine
            assert tokens(gen, submit(gen, prompt=p, max_new_tokens=NEW, **case)) == want[p], (case, p)
        wants.append((case, want))
    # Every case on every prompt, plus plain rows, submitted at once: they share decode steps.
    items = [(want[p], submit(gen, prompt=p, max_new_tokens=NEW, **case)) for case, want in wants for p in PROMPTS]
    items += [(plain[p], submit(gen, prompt=p, max_new_tokens=NEW)) for p in PROMPTS]
    for want_tokens, item in items:
        assert tokens(gen, item) == want_tokens, item.prepared.generation


def test_max_time_stops_decoding_as_generate_does(gen: Served) -> None:
    want = reference(gen, PROMPTS[0], max_time=1e-6)
    item = submit(gen, prompt=PROMPTS[0], max_new_tokens=NEW, max_time=1e-6)
    assert tokens(gen, item) == want and len(want) == 1
    assert result(gen, item).generations[0].finish_reason == "length"


def test_a_generation_config_field_is_honoured_by_every_path(tiny_models: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_models / "tiny-gpt2", tmp_path / "ngram")
    path = tmp_path / "ngram" / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "no_repeat_ngram_size": 2, "suppress_tokens": [14]}))
    served = serve(ModelEntry(name="g", task="generate", path="ngram", device_map="cpu"), tmp_path)
    base = serve(ModelEntry(name="g", task="generate", path="tiny-gpt2", device_map="cpu"), tiny_models)
    try:
        differs = False
        for p in PROMPTS:
            greedy = reference(served, p)  # generate reads the model's generation config itself
            beams = reference(served, p, num_beams=3)
            assert tokens(served, submit(served, prompt=p, max_new_tokens=NEW)) == greedy
            assert tokens(served, submit(served, prompt=p, max_new_tokens=NEW, num_beams=3)) == beams
            assert 14 not in greedy + beams
            differs |= greedy != tokens(base, submit(base, prompt=p, max_new_tokens=NEW))
        assert differs
    finally:
        served.stop()
        base.stop()


def test_diverse_beam_search_is_refused_by_name(gen: Served, tiny_models: Path, tmp_path: Path) -> None:
    for field, value in (("num_beam_groups", 2), ("diversity_penalty", 0.5)):
        with pytest.raises(ValidationError) as err:
            GenerateJob(model="g", prompt="x", num_beams=4, **{field: value})
        assert err.value.errors()[0]["loc"] == (field,)
    GenerateJob(model="g", prompt="x", num_beam_groups=1, diversity_penalty=0.0)
    # From a model's generation config, the job fails with the field named.
    shutil.copytree(tiny_models / "tiny-gpt2", tmp_path / "groups")
    path = tmp_path / "groups" / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_beams": 4, "num_beam_groups": 2}))
    served = serve(ModelEntry(name="g", task="generate", path="groups", device_map="cpu"), tmp_path)
    try:
        with pytest.raises(InvalidInput) as bad:
            served.handler.preprocess(GenerateJob(model="g", prompt="x"))
        assert bad.value.param == "num_beam_groups"
    finally:
        served.stop()


def test_token_ids_outside_the_vocabulary_are_refused_by_name(gen: Served) -> None:
    for field, value in (("bad_words_ids", [[1], [512]]), ("suppress_tokens", [600]), ("eos_token_id", 9999)):
        with pytest.raises(InvalidInput) as err:
            gen.handler.preprocess(GenerateJob(model="g", prompt="x", **{field: value}))
        assert err.value.param == field


def generate_scores(served: Served, prompt: str, seed: int | None = None, **kwargs: Any) -> tuple[list[int], Any]:
    """``generate``'s tokens and processed scores (what it picked each token from)."""
    tok, model = served.handler.tokenizer, served.handler.model
    ids = tok(prompt, return_tensors="pt")
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=8, output_scores=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[0, ids["input_ids"].shape[1] :].tolist(), out.scores


LOGPROB_CASES = [
    {},
    {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2},
    {"do_sample": True, "temperature": 2.0, "top_k": 6, "seed": 7},
]


def test_logprobs_are_the_scores_generate_picks_from_alone_and_batched(gen: Served) -> None:
    wants = []
    for case in LOGPROB_CASES:
        fields = {k: v for k, v in case.items() if k != "seed"}
        for p in PROMPTS[:3]:
            wants.append((case, p, *generate_scores(gen, p, seed=case.get("seed"), **fields)))
    alone = [submit(gen, prompt=p, max_new_tokens=8, logprobs=True, top_logprobs=4, **c) for c, p, *_ in wants[:3]]
    for item in alone:
        item.future.result(timeout=60)
    together = [submit(gen, prompt=p, max_new_tokens=8, logprobs=True, top_logprobs=4, **c) for c, p, *_ in wants]
    plain = [submit(gen, prompt=p, max_new_tokens=8) for p in PROMPTS]  # rows without logprobs, same batch
    for (_, _, want_ids, scores), item in [*zip(wants[:3], alone, strict=True), *zip(wants, together, strict=True)]:
        g = result(gen, item).generations[0]
        assert g.token_ids == want_ids and g.logprobs is not None
        assert [e.token_id for e in g.logprobs] == want_ids
        for step, entry in enumerate(g.logprobs):
            logprobs = torch.log_softmax(scores[step][0].float(), dim=-1)
            assert entry.logprob == pytest.approx(float(logprobs[entry.token_id]), abs=1e-5)
            assert entry.token == gen.handler.tokenizer.decode([entry.token_id])
            values, ids = torch.topk(logprobs, 4)
            finite = [(int(i), float(v)) for i, v in zip(ids, values, strict=True) if v != float("-inf")]
            assert [t.token_id for t in entry.top_logprobs] == [i for i, _ in finite]
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in finite], abs=1e-5)
    for item in plain:
        assert result(gen, item).generations[0].logprobs is None


def test_prompt_logprobs_score_each_prompt_token_with_the_models_logits(gen: Served) -> None:
    tok, model = gen.handler.tokenizer, gen.handler.model
    items = [submit(gen, prompt=p, max_new_tokens=2, logprobs=True, prompt_logprobs=True) for p in PROMPTS]
    for p, item in zip(PROMPTS, items, strict=True):
        ids = tok(p)["input_ids"]
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        scored = result(gen, item).prompt_logprobs
        assert scored is not None and [e.token_id for e in scored] == ids
        assert scored[0].logprob is None
        want = [float(logprobs[j, ids[j + 1]]) for j in range(len(ids) - 1)]
        assert [e.logprob for e in scored[1:]] == pytest.approx(want, abs=1e-5)


def test_logprobs_with_beam_search_are_refused_by_name(gen: Served) -> None:
    with pytest.raises(InvalidInput) as err:
        gen.handler.preprocess(GenerateJob(model="g", prompt="x", num_beams=2, logprobs=True))
    assert err.value.param == "logprobs"
    with pytest.raises(ValidationError):
        GenerateJob(model="g", prompt="x", top_logprobs=2)
    # The engine-free path (generate itself) has no log-probabilities: refused, never silently dropped.
    with pytest.raises(InvalidInput):
        gen.handler.run([GenerateJob(model="g", prompt="x", logprobs=True)])
