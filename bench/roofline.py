"""Roofline: the machine's memory bandwidth, and how close batch-1 decoding comes to its limit.

Decoding one sequence reads every weight once per token, so ``bandwidth / weight bytes`` bounds
batch-1 tokens/s. We measure bandwidth with a large tensor copy (read + write counted) and batch-1
decode through the engine, for GPT-2 small in fp32 and bf16.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import save, say, table
from bench.models import gpt2_124m, mixed_prompts


def bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    import torch

    n = size_mb * 1024 * 1024 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() * 4 / best / 1e9


def run(quick: bool = False) -> dict[str, Any]:
    import transformers

    from queueformer.contract.jobs import GenerateJob
    from queueformer.contract.registry import ModelEntry
    from workers.engine.item import WorkItem
    from workers.holder import serve

    transformers.logging.set_verbosity_error()
    bw = bandwidth_gbs(256 if quick else 1024)
    say(f"roofline: memory bandwidth {bw:.1f} GB/s (tensor copy, read + write)")
    model_dir = gpt2_124m()
    prompt = mixed_prompts(1, lo=32, hi=32)[0]
    rows: list[tuple[Any, ...]] = []
    results: dict[str, Any] = {"bandwidth_gb_s": bw}
    for dtype in ("float32", "bfloat16"):
        entry = ModelEntry(name=f"roof-{dtype}", task="generate", path=str(model_dir), dtype=dtype, device_map="cpu")
        served = serve(entry, model_dir.parent)
        weights = sum(p.numel() * p.element_size() for p in served.handler.model.parameters())
        job = GenerateJob(model="r", prompt=prompt, max_new_tokens=8 if quick else 64, ignore_eos=True)
        served.engine.submit(WorkItem(served.handler.preprocess(job))).future.result()  # warm-up
        started = time.perf_counter()
        out = served.engine.submit(WorkItem(served.handler.preprocess(job))).future.result()
        rate = len(out[0].token_ids) / (time.perf_counter() - started)
        limit = bw * 1e9 / weights
        rows.append((dtype, round(weights / 1e6, 1), limit, rate, rate / limit))
        results[dtype] = {
            "weight_mb": weights / 1e6,
            "limit_tok_s": limit,
            "batch1_tok_s": rate,
            "fraction": rate / limit,
        }
        served.stop()
        del served
    say(
        table(
            "batch-1 decode vs the memory-bandwidth limit",
            ["dtype", "weights MB", "limit tok/s", "achieved tok/s", "fraction"],
            rows,
        )
    )
    say(f"saved {save('roofline', results)}")
    return results
