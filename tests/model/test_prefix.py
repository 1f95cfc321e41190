"""Prefix reuse in the decode engine changes no output: alone, batched, chat turns, sampled, lent from running rows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from queueformer.contract.jobs import GenerateJob
from queueformer.contract.registry import ModelEntry
from workers import metrics
from workers.engine.item import WorkItem
from workers.holder import Served, serve

SYSTEM = (
    "You are a careful assistant. Answer briefly and to the point, and never repeat the question. "
    "Think about the weather, the river and the old bridge before you answer."
)
ENDINGS = ["The weather today", "A queue holds", "x", "The cat sleeps on the warm", "Music and the old bridge"]


def entry(name: str, prefix_cache_tokens: int) -> ModelEntry:
    return ModelEntry(
        name=name,
        task="generate",
        path="tiny-gpt2",
        device_map="cpu",
        max_batch_size=16,
        prefix_cache_tokens=prefix_cache_tokens,
    )


@pytest.fixture(scope="module")
def reuse(tiny_models: Path) -> Iterator[Served]:
    served = serve(entry("pr", 4096), tiny_models)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def plain(tiny_models: Path) -> Iterator[Served]:
    served = serve(entry("pp", 0), tiny_models)
    yield served
    served.stop()


def submit(served: Served, **job: Any) -> WorkItem:
    return served.engine.submit(WorkItem(served.handler.preprocess(GenerateJob(model="g", **job))))


def tokens(item: WorkItem) -> list[int]:
    return list(item.future.result(timeout=120)[0].token_ids)


def reference(served: Served, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = served.handler.model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=[]
        )
    return list(out[0, len(ids) :].tolist())


def stats(served: Served) -> dict[str, float]:
    assert served.engine.prefix is not None
    return served.engine.prefix.stats()


def test_rows_sharing_a_prefix_in_one_batch_decode_as_without_reuse(reuse: Served, plain: Served) -> None:
    before = stats(reuse)
    counted = metrics.PREFILL_SAVED.labels("pr")._value.get()
    prompts = [f"{SYSTEM} {e}" for e in ENDINGS] + ["The cat", "A queue holds jobs until"]
    got = [submit(reuse, prompt=p, max_new_tokens=16, ignore_eos=True) for p in prompts]
    want = [submit(plain, prompt=p, max_new_tokens=16, ignore_eos=True) for p in prompts]
    assert [tokens(i) for i in got] == [tokens(i) for i in want]
    for p, item in zip(prompts, got, strict=True):
        ids = reuse.handler.tokenizer(p)["input_ids"]
        assert tokens(item) == reference(reuse, ids, 16)
    after = stats(reuse)
    # the first row may be admitted before the others arrive; they then copy its prefix
    assert after["hits"] - before["hits"] >= len(ENDINGS) - 1
    assert after["tokens_saved"] > before["tokens_saved"]
    assert metrics.PREFILL_SAVED.labels("pr")._value.get() - counted == after["tokens_saved"] - before["tokens_saved"]
    assert metrics.PREFIX_ROWS.labels("pr", "hit")._value.get() >= after["hits"] - before["hits"]


def test_a_prompt_alone_reuses_the_cached_prefix_and_decodes_the_same(reuse: Served) -> None:
    # Fill the cache with the shared prefix, then send lines one at a time: each starts from it.
    for item in [submit(reuse, prompt=f"{SYSTEM} {e}", max_new_tokens=2) for e in ENDINGS[:2]]:
        tokens(item)
    for ending in ENDINGS:
        before = stats(reuse)
        prompt = f"{SYSTEM} {ending} and then"
        got = tokens(submit(reuse, prompt=prompt, max_new_tokens=12, ignore_eos=True))
        assert stats(reuse)["hits"] == before["hits"] + 1
        assert got == reference(reuse, reuse.handler.tokenizer(prompt)["input_ids"], 12)


def test_chat_lines_share_their_system_turn(reuse: Served, plain: Served) -> None:
    questions = ["What is the weather?", "Where is the bridge?", "Who holds the queue?", "Why?"]
    jobs = [
        {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], "max_new_tokens": 12}
        for q in questions
    ]
    before = stats(reuse)
    got = [submit(reuse, **j, ignore_eos=True) for j in jobs]
    want = [submit(plain, **j, ignore_eos=True) for j in jobs]
    assert [tokens(i) for i in got] == [tokens(i) for i in want]
    for job, item in zip(jobs, got, strict=True):
        ids = list(reuse.handler.preprocess(GenerateJob(model="g", **job)).input_ids)
        assert tokens(item) == reference(reuse, ids, 12)
    assert stats(reuse)["hits"] - before["hits"] >= len(questions) - 1


def test_seeded_sampling_is_the_same_with_and_without_reuse(reuse: Served, plain: Served) -> None:
    job = {"max_new_tokens": 16, "do_sample": True, "temperature": 0.8, "top_k": 30, "seed": 5}
    prompts = [f"{SYSTEM} {e}" for e in ENDINGS]
    got = [submit(reuse, prompt=p, **job) for p in prompts]
    want = [submit(plain, prompt=p, **job) for p in prompts]
    assert [tokens(i) for i in got] == [tokens(i) for i in want]


def test_a_new_row_copies_the_prefix_of_a_running_row(tiny_models: Path) -> None:
    served = serve(entry("pl", 4096), tiny_models)
    try:
        long_prompt = f"{SYSTEM} The weather today"
        first = submit(served, prompt=long_prompt, max_new_tokens=120, ignore_eos=True)
        deadline = time.monotonic() + 30
        while served.engine.running == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert stats(served)["hits"] == 0  # alone: nothing to share with yet
        prompt = f"{SYSTEM} Music"
        second = submit(served, prompt=prompt, max_new_tokens=12, ignore_eos=True)
        got = tokens(second)
        assert not first.future.done()  # it was running when the second one was admitted
        assert stats(served)["hits"] == 1
        assert got == reference(served, served.handler.tokenizer(prompt)["input_ids"], 12)
        assert tokens(first) == reference(served, served.handler.tokenizer(long_prompt)["input_ids"], 120)
    finally:
        served.stop()
