"""Bulk generation: the tutorial loop vs one static batched ``generate`` vs our engine vs the cluster.

GPT-2 small (124M) with random weights, 256 prompts of 16-128 tokens (uniformly mixed), 64 new tokens
each with EOS ignored. Every figure comes from the same run on the same prompts:

* **naive** — ``model.generate`` on one prompt at a time (fp32, the tutorial pattern), on a
  length-stratified subset of 32 prompts (tokens/s is a rate; the whole set would take ~12 minutes);
* **static** — a single batched ``generate`` per configuration (all 256 at once with the static KV
  cache, batches of 64 with the dynamic one; ``--full`` adds the other two); the best one per dtype
  is the baseline;
* **transformers' continuous batching** (``--full``) — ``generate_batch`` with an explicit KV cache;
* **engine** — ``workers.engine.decode.DecodeEngine`` in this process, every prompt submitted at once;
* **cluster** — HTTP API -> Redis -> a worker process -> storage, the prompts as one batch, twice:
  on a fresh worker (no measured rate yet, so one message holds an engine batch), then once the worker
  has announced its rate and the API sizes chunks from it, as in a long bulk job. The ratios use the
  second.

Static, engine and cluster take turns twice (``ROUNDS``) and each figure is the mean of its rounds.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import CACHE, free_port, save, say, table
from bench.models import gpt2_124m, mixed_prompts

NEW_TOKENS = 64
SLOTS = 16  # the cluster worker's --concurrency
ROUNDS = 2


def entry_yaml(model_dir: Path, max_batch: int) -> str:
    lines = ["models:"]
    for name, dtype in (("gpt2-124m", "float32"), ("gpt2-124m-bf16", "bfloat16")):
        lines += [
            f"  {name}:",
            "    task: generate",
            f"    path: {model_dir}",
            f"    dtype: {dtype}",
            "    device_map: cpu",
            f"    max_batch_size: {max_batch}",
            "    max_batch_tokens: 4096",
            "    kv_cache_tokens: 1000000",
            "    max_input_tokens: 1024",
        ]
    return "\n".join(lines) + "\n"


def naive(model: Any, ids: list[list[int]]) -> float:
    import torch

    tokens, started = 0, time.perf_counter()
    for row in ids:
        x = torch.tensor([row])
        with torch.inference_mode():
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=[],
                pad_token_id=0,
            )
        tokens += out.shape[1] - x.shape[1]
    return tokens / (time.perf_counter() - started)


def static(model: Any, ids: list[list[int]], batch: int, cache: str) -> float:
    import torch

    tokens, started = 0, time.perf_counter()
    for at in range(0, len(ids), batch):
        part = ids[at : at + batch]
        width = max(len(r) for r in part)
        x = torch.tensor([[0] * (width - len(r)) + r for r in part])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in part])
        kwargs = {"cache_implementation": "static"} if cache == "static" else {}
        with torch.inference_mode():
            out = model.generate(
                x,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=[],
                pad_token_id=0,
                **kwargs,
            )
        tokens += (out.shape[1] - width) * len(part)
    return tokens / (time.perf_counter() - started)


def manager(model: Any, ids: list[list[int]]) -> float:
    """transformers' continuous-batching manager (``generate_batch``), its KV cache sized explicitly.

    Left to itself it sizes the cache from free memory (7.2 GB and a 29 s first call for GPT-2 small on
    this kind of machine); here it gets pages for every prompt at its final length and the prefill
    budget that measured best for it (1,024 tokens: 81 tok/s, against 71 with 4,096).
    """
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)  # "eos_token_id not set", each call

    page = 128
    pages_per_prompt = -(-(max(map(len, ids)) + NEW_TOKENS) // page)
    config = ContinuousBatchingConfig(page_size=page, num_blocks=pages_per_prompt * len(ids), max_batch_tokens=1024)
    # eos_token_id=None: the manager then decodes every prompt to max_new_tokens (EOS ignored)
    generation = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(ids[:8], generation_config=generation, continuous_batching_config=config)  # warm-up
    started = time.perf_counter()
    out = model.generate_batch(ids, generation_config=generation, continuous_batching_config=config, warmup=False)
    return sum(len(o.generated_tokens) for o in out.values()) / (time.perf_counter() - started)


def engine(served: Any, prompts: list[str]) -> float:
    from queueformer.contract.jobs import GenerateJob
    from workers.engine.item import WorkItem

    jobs = [GenerateJob(model="b", prompt=p, max_new_tokens=NEW_TOKENS, ignore_eos=True) for p in prompts]
    started = time.perf_counter()
    items = [served.engine.submit(WorkItem(served.handler.preprocess(j))) for j in jobs]
    tokens = sum(len(it.future.result()[0].token_ids) for it in items)
    return tokens / (time.perf_counter() - started)


def cluster_run(url: str, model: str, prompts: list[str]) -> tuple[float, dict[str, Any]]:
    from queueformer.client import Client

    lines = [
        {
            "custom_id": f"p{i}",
            "method": "POST",
            "url": "/v1/jobs",
            "body": {"task": "generate", "model": model, "prompt": p, "max_new_tokens": NEW_TOKENS, "ignore_eos": True},
        }
        for i, p in enumerate(prompts)
    ]
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    with Client(url, timeout=120) as qf:
        started = time.perf_counter()
        batch = qf.create_batch(qf.upload(data)["id"], "/v1/jobs")
        batch = qf.wait_batch(batch["id"], poll_s=0.1)
        elapsed = time.perf_counter() - started
    assert batch["status"] == "completed" and batch["request_counts"]["failed"] == 0, batch
    return batch["usage"]["output_tokens"] / elapsed, batch


def cluster_rate(url: str, model: str, prompts: list[str]) -> float:
    return cluster_run(url, model, prompts)[0]


def run(quick: bool = False, full: bool = False, rounds: int = ROUNDS) -> dict[str, Any]:
    """The default run serves the dtype this CPU decodes faster (see ``serving_dtype``); ``full`` runs both.

    The compared patterns take turns, ``rounds`` times, and each figure is their mean: on a shared host
    throughput drifts by ~10 % within a minute, more than the margins the ratios are judged by.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from queueformer.contract.registry import Registry
    from workers.holder import serve

    transformers.logging.set_verbosity_error()
    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    model_dir = gpt2_124m()
    n = 64 if quick else 256
    prompts = mixed_prompts(n)
    registry_path = CACHE / "bench-registry.yaml"
    registry_path.write_text(entry_yaml(model_dir, max_batch=n))
    registry = Registry.load(str(registry_path))
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [tok(p)["input_ids"] for p in prompts]
    by_len = sorted(range(n), key=lambda i: len(ids[i]))
    subset = [ids[i] for i in by_len[:: max(1, n // (8 if quick else 32))]]
    rates: dict[str, float] = {}
    probe = serving_dtype()
    dtypes = ["bf16", "fp32"] if full else [probe["pick"]]
    say(f"  dtype probe (decode-shaped matmuls): {probe}")
    say(
        f"bulk generation: {n} prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens "
        f"({sum(map(len, ids))} in all), {NEW_TOKENS} new tokens each, EOS ignored; dtypes {dtypes}"
    )

    fp32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rates[NAIVE] = naive(fp32, subset)
    say(f"  {NAIVE}: {rates[NAIVE]:.1f} tok/s on {len(subset)} prompts")
    del fp32
    # A single generate of every prompt with the dynamic cache always trails the static cache
    # (208.6 vs 304.9 tok/s bf16, 59.6 vs 90.1 fp32), so only the full run spends minutes on it.
    configs = [(n, "static"), (64, "dynamic")] if not quick else [(n, "static")]
    extra = [(n, "dynamic"), (64, "static")] if full else []
    samples: dict[str, list[float]] = {}

    def measure(key: str, fn: Callable[[], float]) -> None:
        samples.setdefault(key, []).append(fn())
        say(f"  {key}: {samples[key][-1]:.1f} tok/s")

    batches: dict[str, Any] = {}
    with cluster_for(registry_path, model_dir, dtypes) as url:
        for dtype_name in dtypes:
            name = MODELS[dtype_name]
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtypes[dtype_name]).eval()
            served = serve(registry.get(name), model_dir)
            engine(served, prompts[:8])  # warm-up: allocator and kernels
            cluster_run(url, name, prompts[:16])
            for round_ in range(rounds):
                for batch, cache in configs + (extra if round_ == 0 else []):
                    measure(static_key(dtype_name, batch, n, cache), partial(static, model, ids, batch, cache))
                if full and round_ == 0:
                    measure(
                        f"transformers continuous batching {dtype_name} (generate_batch)", partial(manager, model, ids)
                    )
                measure(f"engine {dtype_name} (in-process)", partial(engine, served, prompts))
                if round_ == 0:
                    # A fresh worker has no measured rate yet: the API sends one engine batch per message.
                    measure(
                        f"cluster {dtype_name}, fresh worker (one message)", partial(cluster_rate, url, name, prompts)
                    )
                    # Then the steady state a long bulk job runs in: chunks sized from the announced rate.
                    chunk = announced_chunk(url, name, n)
                rate, batch_record = cluster_run(url, name, prompts)
                samples.setdefault(f"cluster {dtype_name} (API -> Redis -> worker)", []).append(rate)
                say(f"  cluster {dtype_name}, {chunk} lines per message: {rate:.1f} tok/s (round {round_ + 1})")
                batches[dtype_name] = {
                    "id": batch_record["id"],
                    "usage": batch_record["usage"],
                    "lines_per_message": chunk,
                }
            served.stop()
            del model, served
            gc.collect()
    rates.update({k: sum(v) / len(v) for k, v in samples.items()})
    ratios = ratios_of(rates, dtypes)
    print_report(rates, ratios)
    path = save(
        "bulk_generation_full" if full else "bulk_generation",  # a full run keeps the default one's results
        {
            "prompts": n,
            "new_tokens": NEW_TOKENS,
            "dtype_probe": probe,
            "rounds": rounds,
            "tokens_per_s": rates,
            "samples": samples,
            "ratios": ratios,
            "cluster_batches": batches,
        },
    )
    say(f"saved {path}")
    return {"tokens_per_s": rates, "ratios": ratios}


def serving_dtype(batch: int = 32, width: int = 768, repeats: int = 20) -> dict[str, Any]:
    """Which dtype a registry entry should use here: bf16 only where the CPU multiplies it natively.

    CPUs with AVX512-BF16 or AMX run bf16 decode about twice as fast as fp32; without them (AVX2 only)
    PyTorch converts on the fly and bf16 is several times slower. A decode step is mostly
    (batch x width) @ (width x 4 width) products, so those are timed in both dtypes.
    """
    import torch

    timings: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(batch, width, dtype=dtype)
        w = torch.randn(width, 4 * width, dtype=dtype)
        x @ w  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            x @ w
        timings[name] = (time.perf_counter() - started) / repeats
    pick = "bf16" if timings["bf16"] < 0.9 * timings["fp32"] else "fp32"
    return {"pick": pick, "seconds_per_matmul": timings, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


NAIVE = "naive fp32 (one prompt per generate)"
MODELS = {"fp32": "gpt2-124m", "bf16": "gpt2-124m-bf16"}


def static_key(dtype: str, batch: int, n: int, cache: str) -> str:
    shape = f"one generate of all {n}" if batch >= n else f"generates of {batch}"
    return f"static {dtype} ({shape}, {cache} cache)"


@contextmanager
def cluster_for(registry_path: Path, model_dir: Path, dtypes: list[str]) -> Iterator[str]:
    """A cluster (embedded Valkey, API, one worker of 16 slots serving ``dtypes``); yields the API's URL."""
    from queueformer.contract.settings import load_settings
    from queueformer.server.cluster import Cluster

    settings = load_settings(
        registry=str(registry_path),
        data_dir=CACHE / "cluster",
        models_dir=model_dir.parent,
        storage_url=f"file://{CACHE / 'cluster' / 'storage'}",
        redis_url=None,
    )
    queues = [MODELS[d] for d in dtypes]
    c = Cluster(settings, api_port=free_port(), worker_groups=[queues], worker_concurrency=SLOTS)
    with c.running(timeout=300):
        yield c.api_url


def announced_chunk(url: str, model: str, max_batch_size: int, timeout: float = 30.0) -> int:
    """Wait until the worker announces its measured rate; the lines per message the API will then use."""
    from api.routes.batches import lines_per_chunk
    from queueformer.client import Client
    from queueformer.contract.settings import WorkerSettings

    deadline = time.monotonic() + timeout
    with Client(url) as qf:
        while True:
            workers = next(m["workers"] for m in qf.models() if m["id"] == model)
            if any(w.get("lines_per_s") for w in workers) or time.monotonic() > deadline:
                return lines_per_chunk(workers, max_batch_size, WorkerSettings().chunk_target_s)
            time.sleep(0.5)


def best_static(rates: dict[str, float], dtype: str, single: bool) -> tuple[str, float]:
    """The fastest static configuration: among single generates of every prompt, or among all."""
    options = {
        k: v for k, v in rates.items() if k.startswith(f"static {dtype}") and (not single or "one generate" in k)
    }
    key = max(options, key=lambda k: options[k])
    return key, options[key]


def ratios_of(rates: dict[str, float], dtypes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    best_cluster = max(rates[f"cluster {d} (API -> Redis -> worker)"] for d in dtypes)
    out["cluster (best dtype) / naive fp32"] = {"value": best_cluster / rates[NAIVE], "target": 10.0}
    for dtype in dtypes:
        cluster = rates[f"cluster {dtype} (API -> Redis -> worker)"]
        key, base = best_static(rates, dtype, single=True)
        out[f"cluster {dtype} / best single static generate {dtype}"] = {
            "value": cluster / base,
            "target": 1.3,
            "baseline": key,
        }
        key, base = best_static(rates, dtype, single=False)
        out[f"cluster {dtype} / best static batching of any size {dtype}"] = {
            "value": cluster / base,
            "target": 1.3,
            "baseline": key,
        }
        engine_rate = rates[f"engine {dtype} (in-process)"]
        out[f"cluster {dtype} / engine {dtype}"] = {"value": cluster / engine_rate, "target": 0.9}
    return out


def print_report(rates: dict[str, float], ratios: dict[str, Any]) -> None:
    say(table("tokens per second (generated)", ["pattern", "tok/s"], list(rates.items())))
    rows = [(k, v["value"], v["target"], "yes" if v["value"] >= v["target"] else "NO") for k, v in ratios.items()]
    say(table("ratios", ["ratio", "measured", "target", "met"], rows))
