"""GPU benchmarks (CUDA only): a 1B-class decoder in bf16, int8 and nf4, and a QLoRA fine-tune.

* roofline: device memory bandwidth (large copy) and batch-1 decode through the engine, per weight
  format and per decode step (eager, and static shapes replayed as CUDA graphs: ``static_decode``), as
  memory-bandwidth utilisation (MBU: weight bytes read per token x tokens/s over the copy bandwidth;
  target >= 60% in bf16 with graphs); plus transformers' static-cache decode compiled with
  ``torch.compile`` for the same batch-1 prompt (the compiled path the engine is held to);
* bulk generation: 256 mixed-length prompts x 64 new tokens through the engine (eager and graph steps)
  vs one static batched ``generate`` per format;
* fine-tune: QLoRA steps/s and peak device memory on the same model.

Weights are random (a Llama-architecture config of about 1.1B parameters, built locally, no
download), which changes nothing about speed or memory. Results go to ``bench/results/gpu.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.bulk_generation import NEW_TOKENS, engine
from bench.common import CACHE, save, say, table
from bench.models import mixed_prompts, word_tokenizer

FORMATS = ("none", "int8", "nf4")
STEPS = {"eager": "off", "graph": "auto"}  # the engine's decode step -> ModelEntry.static_decode
BATCH1_TOKENS = 256  # long enough that the prefill is a small part of the batch-1 time
MBU_TARGET = 0.60


def llama_1b(root: Path = CACHE) -> Path:
    """A ~1.1B-parameter Llama config (TinyLlama's shape) with random bf16 weights, saved once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / "llama-1b"
    if (path / "config.json").exists():
        return path
    tok = word_tokenizer(32000)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def bandwidth_gbs(size_mb: int = 4096, repeats: int = 10) -> float:
    import torch

    src = torch.ones(size_mb * 1024 * 1024 // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() * 2 / best / 1e9


def entry(path: Path, quant: str, max_batch: int, static_decode: str = "off") -> Any:
    from queueformer.contract.registry import ModelEntry

    return ModelEntry(
        name=f"llama-1b-{quant}",
        static_decode=static_decode,
        task="generate",
        path=str(path),
        dtype="bfloat16",
        quantization=quant,
        device_map="cuda:0",
        max_batch_size=max_batch,
        max_batch_tokens=8192,
        kv_cache_tokens=256 * 256,
        max_input_tokens=1024,
    )


def batch1_rate(served: Any, prompt: str) -> float:
    """Decode tokens/s of one sequence alone (BATCH1_TOKENS new tokens)."""
    from queueformer.contract.jobs import GenerateJob
    from workers.engine.item import WorkItem

    job = GenerateJob(model="b", prompt=prompt, max_new_tokens=BATCH1_TOKENS, ignore_eos=True)
    started = time.perf_counter()
    item = served.engine.submit(WorkItem(served.handler.preprocess(job)))
    tokens = len(item.future.result()[0].token_ids)
    return tokens / (time.perf_counter() - started)


def steps(served: Any, one: str, prompts: list[str], bw: float, weights: int) -> dict[str, Any]:
    """Batch-1 MBU and bulk tokens/s through one engine (after a warm-up that records its graphs)."""
    batch1_rate(served, one)
    engine(served, prompts)
    batch1 = batch1_rate(served, one)
    bulk = engine(served, prompts)
    static = served.engine._static
    return {
        "batch1_tok_s": batch1,
        "batch1_mbu": batch1 * weights / (bw * 1e9),
        "bulk_tok_s": bulk,
        "graphs": static is not None and static.graphs and static.failed is None,
        "graph_captures": static.captures if static is not None else 0,
        "graph_failure": static.failed if static is not None else None,
    }


def static_rate(model: Any, tokenizer: Any, prompts: list[str]) -> float:
    import torch

    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to("cuda")
    # With a static cache on CUDA, transformers compiles the decode step itself (torch.compile).
    kwargs: dict[str, Any] = {"cache_implementation": "static"}
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=4, do_sample=False, eos_token_id=[], **kwargs)  # warm-up/compile
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[], **kwargs)
        torch.cuda.synchronize()
    return (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts) / (time.perf_counter() - started)


def fine_tune(path: Path, steps: int) -> dict[str, Any]:
    """QLoRA over the 4-bit base through the same handler a fine-tune worker runs."""
    import torch
    from transformers import AutoTokenizer

    from queueformer.contract.jobs import FineTuneJob
    from queueformer.contract.registry import Registry
    from workers.handlers.fine_tune import FineTuneHandler, Plan
    from workers.training.data import Blocks, pack

    tok = AutoTokenizer.from_pretrained(path)
    registry = Registry.from_yaml(
        f"models:\n  llama-1b:\n    task: generate\n    path: {path}\n    dtype: bfloat16\n", origin="bench"
    )
    spec = FineTuneJob(
        model="llama-1b",
        training_file="file://unused",
        method="qlora",
        hyperparameters={"max_steps": steps, "batch_size": 8, "block_size": 512, "checkpoint_steps": 10**6},
    )
    texts = [" ".join(mixed_prompts(1, lo=400, hi=600, seed=i)) for i in range(128)]
    handler = FineTuneHandler(registry, path.parent, None, None, None, CACHE / "ft-work", None)  # type: ignore[arg-type]
    plan = Plan(
        "job-benchmark0001",
        spec,
        None,
        registry.get("llama-1b"),
        tok,
        Blocks(pack(tok, texts, 512)),
        None,
        CACHE / "ft-work",
        None,
        None,
        lambda: None,
    )  # type: ignore[arg-type]
    model = handler.build_model(plan)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loader = torch.utils.data.DataLoader(plan.train, batch_size=8, shuffle=True)
    torch.cuda.reset_peak_memory_stats()
    done, started = 0, 0.0
    while done < steps + 2:
        for batch in loader:
            if done == 2:
                torch.cuda.synchronize()
                started = time.perf_counter()  # two warm-up steps
            batch = {k: v.to("cuda") for k, v in batch.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
            done += 1
            if done >= steps + 2:
                break
    torch.cuda.synchronize()
    return {
        "steps": steps,
        "steps_per_s": steps / (time.perf_counter() - started),
        "tokens_per_s": steps * 8 * 512 / (time.perf_counter() - started),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
    }


def run(quick: bool = False) -> dict[str, Any]:
    import torch
    import transformers

    from workers.holder import serve

    if not torch.cuda.is_available():
        say("gpu: skipped, CUDA is not available here (nothing measured, bench/results/gpu.json unchanged)")
        return {}
    transformers.logging.set_verbosity_error()
    path = llama_1b()
    bw = bandwidth_gbs(1024 if quick else 4096)
    say(f"gpu: {torch.cuda.get_device_name(0)}, copy bandwidth {bw:.0f} GB/s")
    n = 32 if quick else 256
    prompts = mixed_prompts(n, lo=16, hi=128, vocab=32000)
    one = mixed_prompts(1, lo=32, hi=32, vocab=32000)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "bandwidth_gb_s": bw,
        "mbu_target": MBU_TARGET,
        "formats": {},
    }
    rows = []
    for quant in FORMATS:
        per: dict[str, Any] = {}
        weights = 0
        for label, mode in STEPS.items():
            served = serve(entry(path, quant, max_batch=n, static_decode=mode), path.parent)
            model, tok = served.handler.model, served.handler.tokenizer
            weights = model.get_memory_footprint()
            per[label] = steps(served, one[0], prompts, bw, weights)
            if label == "eager":
                per["bulk_static_generate_tok_s"] = static_rate(model, tok, prompts)
                per["batch1_static_compiled_tok_s"] = static_rate(model, tok, one) if quant == "none" else None
            served.stop()
            del served, model
            torch.cuda.empty_cache()
        eager, graph = per["eager"], per["graph"]
        results["formats"][quant] = {"weight_gb": weights / 1e9, "limit_tok_s": bw * 1e9 / weights, **per}
        rows.append(
            (
                quant,
                weights / 1e9,
                eager["batch1_mbu"],
                graph["batch1_mbu"],
                eager["bulk_tok_s"],
                graph["bulk_tok_s"],
                per["bulk_static_generate_tok_s"],
                "yes" if graph["graphs"] else f"no ({graph['graph_failure'] or 'eager step'})",
            )
        )
    bf16 = results["formats"]["none"]["graph"]["batch1_mbu"]
    results["bf16_batch1_mbu_target_met"] = bf16 >= MBU_TARGET
    say(
        table(
            f"1.1B Llama: batch-1 MBU ({BATCH1_TOKENS} tokens) and {n} prompts x {NEW_TOKENS} new tokens (tok/s)",
            ["weights", "GB", "MBU eager", "MBU graph", "bulk eager", "bulk graph", "static bulk", "graphs"],
            rows,
        )
    )
    say(f"bf16 batch-1 MBU with graphs: {bf16:.0%} (target {MBU_TARGET:.0%})")
    results["qlora"] = fine_tune(path, steps=5 if quick else 30)
    say(json.dumps({"qlora": results["qlora"]}, indent=2))
    say(f"saved {save('gpu', results)}")
    return results
