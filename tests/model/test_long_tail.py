"""Long-tail batches: rows of mixed prompt lengths and limits finish at different steps, wait in the
batch until it is compacted, join mid-run and are reordered by length; each decodes as if alone."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from queueformer.contract.jobs import GenerateJob
from queueformer.contract.registry import ModelEntry
from workers.engine.item import WorkItem
from workers.holder import serve


def test_rows_with_their_own_lengths_and_limits_decode_as_if_alone(tiny_models: Path) -> None:
    served = serve(
        ModelEntry(name="lt", task="generate", path="tiny-gpt2", device_map="cpu", max_batch_size=16), tiny_models
    )
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
    finally:
        served.stop()
