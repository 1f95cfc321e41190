"""Structured output: which grammar library, and what constraining costs a decode step.

Part 1 compares the three maintained grammar libraries a worker could enforce JSON schemas with
(xgrammar, llguidance, outlines-core) on one realistic schema (nested object, enum, arrays of
objects, required fields, a pattern) and two byte-level BPE vocabularies: the 512-token one of the
tiny GPT-2 the tests use, and a 50,257-token one (GPT-2's size) trained here (``bench.models``). Per
library: the one-off tokenizer setup, compile time (a fresh compiler, no cache) and time to the
first mask, then the per-token cost of filling the allowed-token bitmask and advancing the matcher,
measured by walking a schema-valid document token by token (every token checked against the mask).
The libraries run in alternation, round after round, so host drift hits them alike; the ratios are
against the fastest.

Part 2 runs the chosen library through the decode engine: the same rows decoded free and
constrained (half the rows, then all), alternating, on the tiny GPT-2 and, unless ``--quick``, on a
GPT-2-small-size model with the 50k vocabulary. Candidates that are not installed are skipped.

    python -m bench.structured [--quick]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT, save, say, table

TINY_GPT2 = ROOT.parent / ".queueformer" / "test-models" / "tiny-gpt2"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "status": {"enum": ["active", "suspended", "closed"]},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,6}$"},
        "verified": {"type": "boolean"},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 60},
                "city": {"type": "string", "maxLength": 40},
                "country": {"enum": ["DE", "FR", "US", "JP"]},
            },
            "required": ["street", "city", "country"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 5},
        "orders": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 12},
                    "quantity": {"type": "integer", "minimum": 1},
                    "price": {"type": "number"},
                },
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
            "maxItems": 4,
        },
    },
    "required": ["id", "name", "status", "address", "orders"],
    "additionalProperties": False,
}
DOCUMENT: dict[str, Any] = {
    "id": 4711,
    "name": "Ada Lovelace",
    "status": "active",
    "email": "ada.lovelace@example.org",
    "verified": True,
    "address": {"street": "12 St James's Square", "city": "London", "country": "US"},
    "tags": ["analyst", "engine", "poetry"],
    "orders": [
        {"sku": "AE-1843", "quantity": 2, "price": 19.5},
        {"sku": "NOTE-G", "quantity": 1, "price": 7.25},
    ],
}


# --- the candidates, each behind the same four operations ------------------------------------------


@dataclass
class Candidate:
    name: str
    module: str
    setup: Callable[[Any, int], Any]  # (hf tokenizer, logits width) -> the library's tokenizer object
    compile: Callable[[Any, str], Any]  # (tokenizer object, schema JSON) -> compiled grammar
    matcher: Callable[[Any], Any]
    fill: Callable[[Any, Any, int], None]  # (matcher, int32 bitmask [rows, words], row)
    accept: Callable[[Any, int], bool]
    done: Callable[[Any], bool]


def _xgrammar() -> Candidate:
    def setup(tok: Any, width: int) -> Any:
        import xgrammar as xgr

        return xgr.TokenizerInfo.from_huggingface(tok, vocab_size=width)

    def compile_(info: Any, schema: str) -> Any:
        import xgrammar as xgr

        compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        return compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"), strict_mode=True)

    def matcher(compiled: Any) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)

    return Candidate(
        "xgrammar",
        "xgrammar",
        setup,
        compile_,
        matcher,
        lambda m, bm, row: m.fill_next_token_bitmask(bm, row),
        lambda m, t: bool(m.accept_token(t)),
        lambda m: bool(m.is_terminated()),
    )


def _llguidance() -> Candidate:
    def setup(tok: Any, width: int) -> Any:
        import llguidance.hf

        return llguidance.hf.from_tokenizer(tok, n_vocab=width)

    def compile_(lltok: Any, schema: str) -> Any:
        # Grammars compile lazily inside the matcher; the "compiled" object is a first matcher.
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        m = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return (lltok, grammar, m)

    def matcher(compiled: Any) -> Any:
        import llguidance

        lltok, grammar, _ = compiled
        return llguidance.LLMatcher(lltok, grammar, log_level=0)

    def fill(m: Any, bm: Any, row: int) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(m, bm, row)

    return Candidate(
        "llguidance",
        "llguidance",
        setup,
        compile_,
        matcher,
        fill,
        lambda m, t: bool(m.consume_token(t)),
        lambda m: bool(m.is_stopped()),
    )


def _outlines_core() -> Candidate:
    def setup(tok: Any, width: int) -> Any:
        # outlines-core's own constructor downloads from the hub; the vocabulary is built from the
        # tokenizer's byte-level pieces instead (GPT-2's byte-to-unicode table, inverted).
        import outlines_core
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        back = {c: b for b, c in bytes_to_unicode().items()}
        vocab: dict[bytes, list[int]] = {}
        for piece, i in tok.get_vocab().items():
            if i == tok.eos_token_id or i >= width or piece in tok.all_special_tokens:
                continue
            vocab.setdefault(bytes(back[c] for c in piece), []).append(i)
        return outlines_core.Vocabulary(tok.eos_token_id, vocab)

    def compile_(vocab: Any, schema: str) -> Any:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        index = outlines_core.Index(build_regex_from_schema(schema, whitespace_pattern=""), vocab)
        return index, vocab.get_eos_token_id()

    def matcher(compiled: Any) -> Any:
        import outlines_core

        index, eos = compiled
        return outlines_core.Guide(index), eos

    def fill(m: Any, bm: Any, row: int) -> None:
        v = bm[row]
        m[0].write_mask_into(v.data_ptr(), v.numel(), 4)

    def accept(m: Any, t: int) -> bool:
        guide, eos = m
        if t == eos:  # a Guide has no transition on EOS: it ends where the mask allowed it
            return bool(guide.is_finished())
        guide.advance(t, return_tokens=False)
        return True

    return Candidate(
        "outlines-core", "outlines_core", setup, compile_, matcher, fill, accept, lambda m: bool(m[0].is_finished())
    )


CANDIDATES = (_xgrammar, _llguidance, _outlines_core)


def installed() -> list[Candidate]:
    return [c for c in (make() for make in CANDIDATES) if importlib.util.find_spec(c.module) is not None]


# --- part 1: the libraries alone ---------------------------------------------------------------------


def _bit(bm: Any, row: int, tok: int) -> bool:
    return bool((int(bm[row, tok // 32]) >> (tok % 32)) & 1)


def _walk(c: Candidate, compiled: Any, ids: list[int], eos: int, width: int) -> tuple[float, float]:
    """One document through a fresh matcher: mean µs per token to fill the mask, and to advance."""
    import torch

    bm = torch.zeros((1, (width + 31) // 32), dtype=torch.int32)
    m = c.matcher(compiled)
    fill_ns = accept_ns = 0
    for tok in [*ids, eos]:
        t0 = time.perf_counter_ns()
        c.fill(m, bm, 0)
        t1 = time.perf_counter_ns()
        if not _bit(bm, 0, tok):
            raise AssertionError(f"{c.name} masks out token {tok} of a schema-valid document")
        t2 = time.perf_counter_ns()
        ok = c.accept(m, tok)
        t3 = time.perf_counter_ns()
        if not ok:
            raise AssertionError(f"{c.name} refused token {tok} of a schema-valid document")
        fill_ns += t1 - t0
        accept_ns += t3 - t2
    if not c.done(m):
        raise AssertionError(f"{c.name} did not finish after EOS")
    n = len(ids) + 1
    return fill_ns / n / 1e3, accept_ns / n / 1e3


def _apply_costs(width: int, rounds: int) -> dict[str, float]:
    """µs to apply bitmasks to logits, one row and 8 rows: xgrammar's CPU kernel (what the worker
    uses on CPU) and its plain-torch kernel (what it uses on accelerators)."""
    import torch

    if importlib.util.find_spec("xgrammar") is None:
        return {}
    import xgrammar as xgr

    logits = torch.randn(8, width)
    bm = torch.randint(-(2**31), 2**31 - 1, (8, (width + 31) // 32), dtype=torch.int32)
    fns: dict[str, Callable[[], None]] = {}
    for backend in ("cpu", "torch_native"):
        for rows in (1, 8):
            fns[f"{backend}_{rows}row"] = functools.partial(
                xgr.apply_token_bitmask_inplace,
                logits,
                bm,
                vocab_size=width,
                indices=list(range(rows)),
                backend=backend,
            )
    out: dict[str, float] = {}
    for name, fn in fns.items():
        fn()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            for _ in range(20):
                fn()
            times.append((time.perf_counter_ns() - t0) / 20 / 1e3)
        out[name] = statistics.median(times)
    return out


def compare(tokenizers: dict[str, Any], rounds: int) -> dict[str, Any]:
    schema = json.dumps(SCHEMA)
    text = json.dumps(DOCUMENT, separators=(",", ":"))
    cands = installed()
    say(f"candidates installed: {', '.join(c.name for c in cands) or 'none'}")
    results: dict[str, Any] = {}
    for tname, tok in tokenizers.items():
        width = len(tok)
        ids = tok.encode(text, add_special_tokens=False)
        say(f"\n{tname}: vocabulary {width}, document {len(ids)} tokens")
        setups: dict[str, Any] = {}
        setup_s: dict[str, float] = {}
        for c in cands:
            t0 = time.perf_counter()
            setups[c.name] = c.setup(tok, width)
            setup_s[c.name] = time.perf_counter() - t0
        cold: dict[str, float] = {}
        import torch

        for c in cands:  # the first mask in a process pays one-off start-up costs: reported, kept out of the rounds
            t0 = time.perf_counter()
            c.fill(
                c.matcher(c.compile(setups[c.name], schema)), torch.zeros((1, (width + 31) // 32), dtype=torch.int32), 0
            )
            cold[c.name] = (time.perf_counter() - t0) * 1e3
        samples: dict[str, dict[str, list[float]]] = {
            c.name: {"compile_ms": [], "first_mask_ms": [], "fill_us": [], "accept_us": []} for c in cands
        }
        compiled: dict[str, Any] = {}
        for _ in range(rounds):
            for c in cands:  # alternate: every round runs each library once
                t0 = time.perf_counter()
                compiled[c.name] = c.compile(setups[c.name], schema)
                t1 = time.perf_counter()
                bm = torch.zeros((1, (width + 31) // 32), dtype=torch.int32)
                c.fill(c.matcher(compiled[c.name]), bm, 0)
                t2 = time.perf_counter()
                fill_us, accept_us = _walk(c, compiled[c.name], ids, tok.eos_token_id, width)
                s = samples[c.name]
                s["compile_ms"].append((t1 - t0) * 1e3)
                s["first_mask_ms"].append((t2 - t0) * 1e3)
                s["fill_us"].append(fill_us)
                s["accept_us"].append(accept_us)
        med = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
        for name, m in med.items():
            m["setup_ms"] = setup_s[name] * 1e3
            m["cold_first_mask_ms"] = cold[name]
            m["per_token_us"] = m["fill_us"] + m["accept_us"]
        best_compile = min(m["first_mask_ms"] for m in med.values())
        best_token = min(m["per_token_us"] for m in med.values())
        rows = []
        for name, m in med.items():
            m["first_mask_ratio"] = m["first_mask_ms"] / best_compile
            m["per_token_ratio"] = m["per_token_us"] / best_token
            rows.append(
                (
                    name,
                    m["setup_ms"],
                    m["compile_ms"],
                    m["first_mask_ms"],
                    m["first_mask_ratio"],
                    m["fill_us"],
                    m["accept_us"],
                    m["per_token_us"],
                    m["per_token_ratio"],
                )
            )
        say(
            table(
                f"{tname} (vocabulary {width}): medians of {rounds} alternating rounds",
                [
                    "library",
                    "tokenizer setup ms",
                    "compile ms",
                    "to first mask ms",
                    "x best",
                    "fill µs/tok",
                    "advance µs/tok",
                    "µs/tok",
                    "x best",
                ],
                rows,
            )
        )
        apply = _apply_costs(width, rounds)
        say("  applying a bitmask to logits (µs): " + ", ".join(f"{k} {v:.1f}" for k, v in apply.items()))
        results[tname] = {"vocab": width, "document_tokens": len(ids), "libraries": med, "apply_us": apply}
    return results


# --- part 2: the decode engine, free vs constrained ----------------------------------------------------


def _engine_rates(model_dir: Path, rows: int, new_tokens: int, rounds: int) -> dict[str, Any]:
    """Generated tokens/s of ``rows`` sampled rows: none, half or all of them held to SCHEMA."""
    import transformers

    from queueformer.registry import ModelEntry
    from workers.engine.constraint import ConstraintSpec
    from workers.engine.decode import GenRequest
    from workers.engine.item import WorkItem
    from workers.holder import serve

    transformers.logging.set_verbosity_error()
    entry = ModelEntry(name="bench-structured", task="generate", path=str(model_dir), device_map="cpu")
    served = serve(entry, model_dir.parent)
    tok = served.handler.tokenizer
    grammar = served.handler.grammars.compile(ConstraintSpec.json_schema(SCHEMA))
    prompts = [tok.encode(f"Record {i} as JSON:") for i in range(rows)]

    def run(constrained: int) -> tuple[float, int]:
        reqs = [
            GenRequest(
                input_ids=tuple(p),
                max_new_tokens=new_tokens,
                do_sample=True,
                top_k=0,
                seed=i,
                # Free rows ignore EOS so every row decodes its full budget; constrained rows end
                # when their document is complete, so rates are per generated token.
                eos=frozenset(served.handler.eos_ids()) if i < constrained else frozenset(),
                constraint=grammar if i < constrained else None,
            )
            for i, p in enumerate(prompts)
        ]
        started = time.perf_counter()
        items = [served.engine.submit(WorkItem(r)) for r in reqs]
        outs = [it.future.result(timeout=600) for it in items]
        seconds = time.perf_counter() - started
        generated = sum(len(o[0].token_ids) for o in outs)
        for r, o in zip(reqs, outs, strict=True):
            if r.constraint is not None and o[0].finish_reason == "stop":
                json.loads(tok.decode(o[0].token_ids, skip_special_tokens=True))
        return generated / seconds, generated

    run(rows)  # warm-up: compiles the schema once (cached), first allocations
    modes = {"free": 0, "half constrained": rows // 2, "all constrained": rows}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    tokens: dict[str, int] = {}
    for _ in range(rounds):
        for mode, n in modes.items():
            rate, generated = run(n)
            rates[mode].append(rate)
            tokens[mode] = generated
    served.stop()
    free = statistics.fmean(rates["free"])
    out: dict[str, Any] = {"rows": rows, "max_new_tokens": new_tokens, "rounds": rounds}
    for mode in modes:
        mean = statistics.fmean(rates[mode])
        out[mode] = {"tok_s": mean, "runs": rates[mode], "tokens_last_run": tokens[mode], "vs_free": mean / free}
    return out


def run(quick: bool = False) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from bench.models import byte_bpe_tokenizer, gpt2_124m_bpe

    rounds = 3 if quick else 7
    tokenizers = {
        "tiny-gpt2 (byte-level BPE, 512)": AutoTokenizer.from_pretrained(TINY_GPT2),
        "byte-level BPE 50k (trained on the stdlib)": byte_bpe_tokenizer(),
    }
    libraries = compare(tokenizers, rounds)
    engine: dict[str, Any] = {}
    say("\nengine: sampled rows, free vs constrained to the schema (alternating rounds)")
    engine["tiny-gpt2"] = _engine_rates(TINY_GPT2, rows=16, new_tokens=96, rounds=2 if quick else 4)
    if not quick:
        engine["gpt2-124m-bpe"] = _engine_rates(gpt2_124m_bpe(), rows=8, new_tokens=96, rounds=2)
    rows = [
        (model, r["rows"], mode, r[mode]["tok_s"], r[mode]["vs_free"])
        for model, r in engine.items()
        for mode in ("free", "half constrained", "all constrained")
    ]
    say(table("engine tokens/s (mean of rounds)", ["model", "rows", "mode", "tok/s", "x free"], rows))
    payload = {"schema": SCHEMA, "document": DOCUMENT, "libraries": libraries, "engine": engine}
    path = save("structured", payload)
    say(f"\nsaved {path}")
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.structured")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    run(quick=args.quick)


if __name__ == "__main__":
    main()
