"""On a CUDA device: quantized loading, device placement and greedy equivalence through the engine.

Skipped where CUDA is absent (the CPU suites cover the same code paths on the CPU kernels).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from queueformer.contract.jobs import GenerateJob
from queueformer.contract.registry import ModelEntry
from tests.model.conftest import reference
from workers.engine.item import WorkItem
from workers.holder import serve

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["The weather today", "A queue holds", "The cat sat on the"]


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
def test_greedy_decode_on_cuda_equals_plain_transformers(tiny_models: Path, quant: str) -> None:
    entry = ModelEntry(
        name=f"gpu-{quant}", task="generate", path="tiny-gpt2", quantization=quant, dtype="float16", device_map="auto"
    )
    served = serve(entry, tiny_models)
    try:
        assert served.info["devices"] and all(d.startswith("cuda") for d in served.info["devices"])
        jobs = [GenerateJob(model=entry.name, prompt=p, max_new_tokens=16) for p in PROMPTS]
        got = [served.engine.submit(WorkItem(served.handler.preprocess(j))).future.result()[0].token_ids for j in jobs]
    finally:
        served.stop()
    model, tok = reference(entry, tiny_models)
    for prompt, ids in zip(PROMPTS, got, strict=True):
        enc = tok(prompt, return_tensors="pt").to(model.device)
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
        want = out[0, enc["input_ids"].shape[1] :].tolist()
        assert list(ids) == want[: len(ids)] and (len(ids) == len(want) or want[len(ids)] == tok.eos_token_id)
