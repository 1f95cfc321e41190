"""Long-tail batches: rows of mixed prompt lengths and limits are prefilled packed, finish at different
steps, wait in the batch until it is compacted, join mid-run and are reordered by length; each decodes
as if alone. On GPT-2 (learned positions) and a Llama with grouped-query attention (rotary positions)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from queueformer.contract.jobs import GenerateJob
from queueformer.contract.registry import ModelEntry
from tests.model.static_cases import llama_gqa
from workers.engine.item import WorkItem
from workers.holder import serve


@pytest.mark.parametrize("model", ["tiny-gpt2", "llama-gqa"])
def test_rows_with_their_own_lengths_and_limits_decode_as_if_alone(
    model: str, tiny_models: Path, tmp_path: Path
) -> None:
    path = tiny_models / model if model == "tiny-gpt2" else llama_gqa(tmp_path, tiny_models / "tiny-gpt2")
    # 96 prefill tokens a forward: admissions of 16 rows are cut into several packs
    entry = ModelEntry(
        name="lt", task="generate", path=path.name, device_map="cpu", max_batch_size=16, max_batch_tokens=96
    )
    served = serve(entry, path.parent)
    try:
        rng = random.Random(3)
        words = ["the", "old", "bridge", "crosses", "river", "near", "village", "a", "queue", "holds", "jobs"]
        prompts = [" ".join(rng.choice(words) for _ in range(rng.choice([1, 2, 3, 5, 8, 40]))) for _ in range(40)]
        limits = [rng.randint(1, 30) for _ in prompts]
        jobs = [
            GenerateJob(model="lt", prompt=p, max_new_tokens=n, ignore_eos=True)
            for p, n in zip(prompts, limits, strict=True)
        ]
        items = [served.engine.submit(WorkItem(served.handler.preprocess(j))) for j in jobs]
        tok, model = served.handler.tokenizer, served.handler.model
        for prompt, n, item in zip(prompts, limits, items, strict=True):
            ids = tok(prompt, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**ids, max_new_tokens=n, do_sample=False, eos_token_id=[])
            want = out[0, ids["input_ids"].shape[1] :].tolist()
            assert item.future.result(timeout=120)[0].token_ids == want
        assert served.engine.running == 0
        assert served.engine.packs  # every layer honoured the packed bounds: no fallback to padded groups
    finally:
        served.stop()


def test_rows_join_in_groups_where_the_kv_budget_binds(tiny_models: Path) -> None:
    """Where the KV budget, not the batch cap, limits the batch, rows free up one or two a step; each
    admission copies the running cache, so rows wait until an eighth of the batch can join together."""
    path = tiny_models / "tiny-gpt2"
    # prompts of 3 tokens, at most 20 new: the budget holds 64 rows of the longest, the cap 256
    entry = ModelEntry(
        name="kv",
        task="generate",
        path=path.name,
        device_map="cpu",
        max_batch_size=256,
        kv_cache_tokens=64 * 23,
        prefix_cache_tokens=0,
    )
    served = serve(entry, path.parent)
    try:
        rng = random.Random(5)
        words = ["the", "old", "bridge", "crosses", "river", "near", "village", "a", "queue", "holds", "jobs"]
        prompts = [" ".join(rng.choice(words) for _ in range(3)) for _ in range(240)]
        limits = [20 if i % 10 == 0 else rng.randint(1, 20) for i in range(len(prompts))]
        jobs = [
            GenerateJob(model="kv", prompt=p, max_new_tokens=n, ignore_eos=True)
            for p, n in zip(prompts, limits, strict=True)
        ]
        prepared = [WorkItem(served.handler.preprocess(j)) for j in jobs]
        items = [served.engine.submit(w) for w in prepared]
        tok, model = served.handler.tokenizer, served.handler.model
        for prompt, n, item in list(zip(prompts, limits, items, strict=True))[::12]:
            ids = tok(prompt, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**ids, max_new_tokens=n, do_sample=False, eos_token_id=[])
            assert item.future.result(timeout=120)[0].token_ids == out[0, ids["input_ids"].shape[1] :].tolist()
        for item in items:
            item.future.result(timeout=120)
        # one row per admission would be ~180 admissions; an eighth of 64 rows at a time is at most 240 / 8
        assert served.engine.admissions <= 240 // 8 + 2, served.engine.admissions
    finally:
        served.stop()
