"""Batch-file workloads on a Llama-style GQA model: the lines, static-batching baselines, and cluster runs.

A workload is a list of lines, each a prompt (synthetic words, one token each) and its own
``max_new_tokens``, generated with EOS ignored. Figures count useful tokens only: what each line
asked for, never the padding steps a static batch decodes past a short line's end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import CACHE


@dataclass(frozen=True)
class Line:
    prompt: str
    max_new_tokens: int


def registry_yaml(model_dir: Path, entries: dict[str, dict[str, Any]]) -> str:
    """One registry entry per name, all serving ``model_dir`` on CPU; ``entries`` adds per-entry fields."""
    out = ["models:"]
    for name, extra in entries.items():
        fields = {
            "task": "generate",
            "path": str(model_dir),
            "dtype": "float32",
            "device_map": "cpu",
            "max_batch_size": 256,
            "max_batch_tokens": 4096,
            "kv_cache_tokens": 1_000_000,
            "max_input_tokens": 1024,
            **extra,
        }
        out.append(f"  {name}:")
        out += [f"    {k}: {v}" for k, v in fields.items()]
    return "\n".join(out) + "\n"


@contextmanager
def cluster(registry_path: Path, model_dir: Path, queues: list[str], slots: int = 16) -> Iterator[str]:
    """Embedded Valkey, the API and one worker serving ``queues``; yields the API's URL."""
    from bench.common import free_port
    from queueformer.contract.settings import load_settings
    from queueformer.server.cluster import Cluster

    settings = load_settings(
        registry=str(registry_path),
        data_dir=CACHE / "cluster",
        models_dir=model_dir.parent,
        storage_url=f"file://{CACHE / 'cluster' / 'storage'}",
        redis_url=None,
    )
    c = Cluster(settings, api_port=free_port(), worker_groups=[queues], worker_concurrency=slots)
    with c.running(timeout=300):
        yield c.api_url


def batch_rate(url: str, model: str, lines: list[Line]) -> float:
    """Useful tokens per second for ``lines`` sent as one batch through the API (upload to completion)."""
    from queueformer.client import Client

    body = [
        {
            "custom_id": f"l{i}",
            "method": "POST",
            "url": "/v1/jobs",
            "body": {
                "task": "generate",
                "model": model,
                "prompt": line.prompt,
                "max_new_tokens": line.max_new_tokens,
                "ignore_eos": True,
            },
        }
        for i, line in enumerate(lines)
    ]
    data = b"".join(json.dumps(x).encode() + b"\n" for x in body)
    with Client(url, timeout=300) as qf:
        started = time.perf_counter()
        batch = qf.create_batch(qf.upload(data)["id"], "/v1/jobs")
        batch = qf.wait_batch(batch["id"], poll_s=0.1, timeout=3600)
        elapsed = time.perf_counter() - started
    assert batch["status"] == "completed" and batch["request_counts"]["failed"] == 0, batch
    return float(batch["usage"]["output_tokens"]) / elapsed


def static_rate(model: Any, ids: list[list[int]], new: list[int], batch: int, sort: bool) -> float:
    """Careful static batching: ``generate`` on batches of ``batch`` lines (sorted by length when ``sort``).

    Each batch decodes to its longest line's ``max_new_tokens``; only the tokens lines asked for count.
    """
    import torch

    order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if sort else list(range(len(ids)))
    useful, started = 0, time.perf_counter()
    for at in range(0, len(order), batch):
        part = [ids[i] for i in order[at : at + batch]]
        width = max(len(r) for r in part)
        x = torch.tensor([[0] * (width - len(r)) + r for r in part])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in part])
        with torch.inference_mode():
            model.generate(
                x,
                attention_mask=mask,
                max_new_tokens=max(new[i] for i in order[at : at + batch]),
                do_sample=False,
                eos_token_id=[],
                pad_token_id=0,
            )
        useful += sum(new[i] for i in order[at : at + batch])
    return useful / (time.perf_counter() - started)


def loop_rate(model: Any, ids: list[list[int]], new: list[int]) -> float:
    """The tutorial loop: one ``generate`` per line."""
    import torch

    useful, started = 0, time.perf_counter()
    for row, n in zip(ids, new, strict=True):
        x = torch.tensor([row])
        with torch.inference_mode():
            model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=[], pad_token_id=0
            )
        useful += n
    return useful / (time.perf_counter() - started)
