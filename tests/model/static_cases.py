"""Shared by the static decode step's tests on CPU (its eager form) and on CUDA (its graphs).

``run_mixed`` drives one engine through a batch whose rows have different lengths, finish at different
steps and are joined mid-flight by more rows at a fixed point (after the first row's fourth token), so
the batch passes through sizes that are not buckets, row removals, a join and an arena that grows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from queueformer.contract.jobs import GenerateJob
from workers.engine.item import WorkItem
from workers.holder import Served


@dataclass(frozen=True)
class Case:
    prompt: str
    new: int
    sample: bool = False  # seeded sampling: compared between engines only (generate draws differently per batch)


FIRST = [
    Case("The weather today", 70),  # 70 new tokens: the batch outgrows the first 64-column arena
    Case("A queue holds many jobs for the workers", 8),
    Case("The cat", 20),
]
LATE = [
    Case("Music and the old bridge over the river near the village", 12),
    Case("x", 30),
    Case("The river", 15, sample=True),
]


def llama_gqa(root: Path, tokenizer_from: Path) -> Path:
    """A two-layer Llama with grouped-query attention (4 query heads, 2 KV heads) and seeded random weights."""
    out = root / "tiny-llama-gqa"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        initializer_range=0.5,  # wide logits: greedy choices with clear margins, no near-ties
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def job(served: Served, case: Case) -> GenerateJob:
    extra: dict[str, Any] = {"do_sample": True, "temperature": 0.9, "seed": 7} if case.sample else {"do_sample": False}
    return GenerateJob(model=served.entry.name, prompt=case.prompt, max_new_tokens=case.new, ignore_eos=True, **extra)


def run_mixed(served: Served) -> list[list[int]]:
    """Token ids of FIRST then LATE; the LATE rows are submitted when the first row streams its fourth piece."""
    streamed: list[int] = []
    late: list[WorkItem] = []

    def on_token(index: int, token: int, text: str) -> None:  # runs on the engine's thread, between steps
        streamed.append(token)
        if len(streamed) == 4:
            late.extend(served.engine.submit(WorkItem(served.handler.preprocess(job(served, c)))) for c in LATE)

    first = [WorkItem(served.handler.preprocess(job(served, c))) for c in FIRST]
    first[0].on_token = on_token
    for item in first:
        served.engine.submit(item)
    out = [list(item.future.result(timeout=120)[0].token_ids) for item in first]
    assert len(late) == len(LATE), "the late rows were submitted mid-flight"
    return out + [list(item.future.result(timeout=120)[0].token_ids) for item in late]


def alone(served: Served, prompt: str, new: int) -> list[int]:
    """``model.generate`` on the prompt alone: greedy, every token (no EOS stop)."""
    tok, model = served.handler.tokenizer, served.handler.model
    ids = tok(prompt, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=new, do_sample=False, eos_token_id=[], pad_token_id=0)
    return list(out[0, ids["input_ids"].shape[1] :].tolist())
