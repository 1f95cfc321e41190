"""Encoder tasks: fill-mask and classify items/s, batched by the engine vs one at a time.

DistilBERT-base size (66M parameters) with random weights, 256 texts of 16-128 tokens. "One at a
time" runs each item through the handler alone (the pipeline-per-request pattern); "batched" submits
all of them to the length-bucketing engine a worker uses.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import save, say, table
from bench.models import distilbert, mixed_prompts


def run(quick: bool = False) -> dict[str, Any]:
    import transformers

    from queueformer.contract.jobs import ClassifyJob, FillMaskJob
    from queueformer.contract.registry import ModelEntry
    from workers.engine.item import WorkItem
    from workers.holder import serve

    transformers.logging.set_verbosity_error()
    mlm_dir, cls_dir = distilbert()
    n = 64 if quick else 256
    texts = mixed_prompts(n, vocab=30000, seed=1)
    jobs = {
        "fill-mask": [FillMaskJob(model="m", text=t.replace(" ", " [MASK] ", 1), top_k=5) for t in texts],
        "classify": [ClassifyJob(model="c", text=t, top_k=None) for t in texts],
    }
    dirs = {"fill-mask": mlm_dir, "classify": cls_dir}
    rows: list[tuple[Any, ...]] = []
    results: dict[str, Any] = {}
    for task, task_jobs in jobs.items():
        entry = ModelEntry(
            name=f"bench-{task}",
            task=task,
            path=str(dirs[task]),
            device_map="cpu",
            max_batch_size=64,
            max_batch_tokens=8192,
        )
        served = serve(entry, dirs[task].parent)
        served.handler.run(task_jobs[:4])  # warm-up
        started = time.perf_counter()
        for job in task_jobs:
            served.handler.run([job])
        alone = n / (time.perf_counter() - started)
        started = time.perf_counter()
        items = [served.engine.submit(WorkItem(served.handler.preprocess(j))) for j in task_jobs]
        for it in items:
            it.future.result()
        batched = n / (time.perf_counter() - started)
        served.stop()
        rows.append((task, alone, batched, batched / alone))
        results[task] = {"one_at_a_time_items_s": alone, "batched_items_s": batched, "speedup": batched / alone}
        say(f"  {task}: {alone:.1f} items/s alone, {batched:.1f} items/s batched")
    say(table(f"encoder tasks ({n} texts of 16-128 tokens)", ["task", "one at a time", "batched", "speedup"], rows))
    say(f"saved {save('encoder_tasks', results)}")
    return results
