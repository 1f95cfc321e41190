"""Structured output: which grammar library, and what constraining costs a decode step.

Part 1 compares the three maintained grammar libraries a worker could enforce JSON schemas with
(xgrammar, llguidance, outlines-core) on one realistic schema (nested object, enums, a pattern,
string lengths, arrays of objects, required fields) and two byte-level BPE vocabularies: the 512-token
one of the tiny GPT-2 the tests use, and a 50,257-token one (GPT-2's size) trained here
(``bench.models``). Per library: the one-off tokenizer setup, compile time (a fresh compiler, no
cache) and time to the first mask, the per-token cost of filling the allowed-token bitmask and
advancing the matcher (walking a schema-valid document token by token, every token checked against
the mask), and on the small vocabulary how many documents sampled through its mask from random
logits are valid. The libraries run in alternation, round after round, so host drift hits them
alike; the ratios are against the fastest. Candidates that are not installed are skipped (the
project depends on llguidance only: ``pip install xgrammar outlines-core`` for the comparison).

Part 2 measures the worker's own path (``workers.engine.constraint``: applying masks, filling 8 rows'
masks, ``mask_rows``) and then the decode engine: the same sampled rows decoded free and constrained
(half the rows, then all), alternating, with the time spent masking measured inside the decode
steps, on the tiny GPT-2 and, unless ``--quick``, on a GPT-2-small-size model with the 50k vocabulary.

    python -m bench --only structured [--quick]
"""

from __future__ import annotations

import argparse
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
        # llguidance builds its lexer lazily, on the first mask: "to first mask" is its compile time.
        # As in the worker, a template matcher is kept and each row starts from a copy of it.
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        m = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def matcher(template: Any) -> Any:
        return template.deep_copy()

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
    fill_ns = accept_ns = steps = 0
    for tok in [*ids, eos]:
        steps += 1
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
        if c.done(m):
            break
    return fill_ns / steps / 1e3, accept_ns / steps / 1e3


def _raw_bytes(tok: Any, ids: list[int]) -> bytes:
    """What byte-level BPE tokens spell, before any UTF-8 decoding (which would hide invalid bytes)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    back = {c: b for b, c in bytes_to_unicode().items()}
    pieces = tok.convert_ids_to_tokens([i for i in ids if i != tok.eos_token_id])
    return b"".join(bytes(back[ch] for ch in piece) for piece in pieces)


def validity(c: Candidate, setup: Any, tok: Any, samples: int, max_tokens: int = 600) -> dict[str, int]:
    """Sample documents through the grammar with random logits (any allowed token may come next) and
    count those that are valid UTF-8, parse as JSON and validate against SCHEMA."""
    import jsonschema
    import torch

    width = len(tok)
    compiled = c.compile(setup, json.dumps(SCHEMA))
    rng = torch.Generator().manual_seed(0)
    shifts = torch.arange(32, dtype=torch.int32)
    counts = {"finished": 0, "valid": 0, "bad_utf8": 0, "bad_json": 0, "bad_schema": 0}
    for _ in range(samples):
        m, ids = c.matcher(compiled), []
        bm = torch.zeros((1, (width + 31) // 32), dtype=torch.int32)
        for _ in range(max_tokens):
            c.fill(m, bm, 0)
            allowed = ((bm[0].unsqueeze(-1) >> shifts) & 1).view(-1)[:width].bool()
            logits = torch.randn(width, generator=rng).masked_fill(~allowed, float("-inf"))
            t = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=rng))
            if not c.accept(m, t):
                raise AssertionError(f"{c.name} refused a token its own mask allowed")
            ids.append(t)
            if t == tok.eos_token_id or c.done(m):
                break
        else:
            continue  # still inside the document at the cap: neither valid nor invalid
        counts["finished"] += 1
        try:
            text = _raw_bytes(tok, ids).decode("utf-8")
        except UnicodeDecodeError:
            counts["bad_utf8"] += 1
            continue
        try:
            value = json.loads(text)
        except ValueError:
            counts["bad_json"] += 1
            continue
        try:
            jsonschema.validate(value, SCHEMA)
        except jsonschema.ValidationError:
            counts["bad_schema"] += 1
            continue
        counts["valid"] += 1
    return counts


def compare(tokenizers: dict[str, Any], rounds: int, samples: int) -> dict[str, Any]:
    import torch

    schema = json.dumps(SCHEMA)
    text = json.dumps(DOCUMENT, separators=(",", ":"))
    cands = installed()
    say(f"candidates installed: {', '.join(c.name for c in cands) or 'none'}")
    results: dict[str, Any] = {}
    for n, (tname, tok) in enumerate(tokenizers.items()):
        width = len(tok)
        ids = tok.encode(text, add_special_tokens=False)
        say(f"\n{tname}: vocabulary {width}, document {len(ids)} tokens")
        setups: dict[str, Any] = {}
        med: dict[str, dict[str, Any]] = {}
        for c in cands:
            t0 = time.perf_counter()
            setups[c.name] = c.setup(tok, width)
            med[c.name] = {"setup_ms": (time.perf_counter() - t0) * 1e3}
            # The first mask in a process pays one-off start-up costs: reported, kept out of the rounds.
            t0 = time.perf_counter()
            c.fill(
                c.matcher(c.compile(setups[c.name], schema)), torch.zeros((1, (width + 31) // 32), dtype=torch.int32), 0
            )
            med[c.name]["cold_first_mask_ms"] = (time.perf_counter() - t0) * 1e3
        samples_: dict[str, dict[str, list[float]]] = {
            c.name: {"compile_ms": [], "first_mask_ms": [], "fill_us": [], "accept_us": []} for c in cands
        }
        for _ in range(rounds):
            for c in cands:  # alternate: every round runs each library once
                t0 = time.perf_counter()
                compiled = c.compile(setups[c.name], schema)
                t1 = time.perf_counter()
                c.fill(c.matcher(compiled), torch.zeros((1, (width + 31) // 32), dtype=torch.int32), 0)
                t2 = time.perf_counter()
                fill_us, accept_us = _walk(c, compiled, ids, tok.eos_token_id, width)
                s = samples_[c.name]
                s["compile_ms"].append((t1 - t0) * 1e3)
                s["first_mask_ms"].append((t2 - t0) * 1e3)
                s["fill_us"].append(fill_us)
                s["accept_us"].append(accept_us)
        for name, s in samples_.items():
            med[name].update({k: statistics.median(v) for k, v in s.items()})
            med[name]["per_token_us"] = med[name]["fill_us"] + med[name]["accept_us"]
        if n == 0:  # validity: on the small vocabulary, where sampling is quick
            for c in cands:
                med[c.name]["validity"] = validity(c, setups[c.name], tok, samples)
        best_compile = min(m["first_mask_ms"] for m in med.values())
        best_token = min(m["per_token_us"] for m in med.values())
        rows = []
        for name, m in med.items():
            m["first_mask_ratio"] = m["first_mask_ms"] / best_compile
            m["per_token_ratio"] = m["per_token_us"] / best_token
            v = m.get("validity")
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
                    f"{v['valid']}/{v['finished']}" if v else "-",
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
                    "valid samples",
                ],
                rows,
            )
        )
        results[tname] = {"vocab": width, "document_tokens": len(ids), "libraries": med}
        if n == 0:
            for name, m in med.items():
                v = m["validity"]
                say(f"  {name}: {v['valid']} of {v['finished']} sampled documents valid; {v}")
    return results


def worker_costs(tok: Any, rounds: int) -> dict[str, float]:
    """The worker's own path (workers.engine.constraint), in µs: applying the document's real masks to
    one row and to 8 rows of logits; and, for 8 rows walking the document at staggered places, each
    step's mask fill one row after another vs on llguidance's thread pool, and the whole ``mask_rows``
    (fill + apply) the engine calls."""
    import llguidance.torch
    import torch

    from workers.engine.constraint import ConstraintSpec, Grammars, _parallel, apply_bitmask, mask_rows

    ids = tok.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    grammar = Grammars(tok, width=len(tok), stop_ids=[tok.eos_token_id]).compile(ConstraintSpec.json_schema(SCHEMA))
    words = (grammar.mask_width + 31) // 32
    walker = grammar.constraint()
    masks = []
    for t in ids:
        masks.append(torch.empty((1, words), dtype=torch.int32))
        walker.fill(masks[-1], 0)
        walker.accept(t)
    logits = torch.randn(8, len(tok))
    eights = [torch.cat(masks[i : i + 8]) for i in range(0, len(masks) - 7, 8)]
    offsets = [r * len(ids) // 16 for r in range(8)]
    steps = len(ids) - offsets[-1]
    bm = torch.empty((8, words), dtype=torch.int32)

    def walk(step: Callable[[list[Any]], None]) -> float:
        rows = [grammar.constraint() for _ in offsets]
        for c, off in zip(rows, offsets, strict=True):
            for t in ids[:off]:
                c.accept(t)
        spent = 0
        for k in range(steps):
            t0 = time.perf_counter_ns()
            step(rows)
            spent += time.perf_counter_ns() - t0
            for c, off in zip(rows, offsets, strict=True):
                c.accept(ids[off + k])
        return spent / steps / 1e3

    def apply_all(batches: list[Any], rows: list[int]) -> float:
        t0 = time.perf_counter_ns()
        for m in batches:
            apply_bitmask(logits, m, rows)
        return (time.perf_counter_ns() - t0) / len(batches) / 1e3

    def sequential(rows: list[Any]) -> None:
        for i, c in enumerate(rows):
            c.fill(bm, i)

    def parallel(rows: list[Any]) -> None:
        llguidance.torch.fill_next_token_bitmask_par(_parallel(), [(c.matcher, i) for i, c in enumerate(rows)], bm)

    cases: dict[str, Callable[[], float]] = {
        "apply_1row": lambda: apply_all(masks, [0]),
        "apply_8rows": lambda: apply_all(eights, list(range(8))),
        "fill_8rows_sequential": lambda: walk(sequential),
        "fill_8rows_parallel": lambda: walk(parallel),
        "mask_rows_8rows": lambda: walk(lambda rows: mask_rows(logits, rows)),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name].append(fn())
    out = {f"{k}_us": statistics.median(v) for k, v in times.items()}
    say(
        "  worker path, µs per step (medians): "
        + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in times.items())
    )
    return out


# --- part 2: the decode engine, free vs constrained ----------------------------------------------------


def _engine_rates(model_dir: Path, rows: int, new_tokens: int, rounds: int) -> dict[str, Any]:
    """Generated tokens/s of ``rows`` sampled rows with none, half or all of them held to SCHEMA, and
    the share of decode-step time spent in ``mask_rows`` (timed inside the engine)."""
    import transformers
    from transformers import GenerationConfig

    import workers.engine.decode as decode
    from queueformer.contract.registry import ModelEntry
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
    clock = {"mask": 0.0, "steps": 0.0}
    real_mask_rows = decode.mask_rows

    def timed_mask_rows(logits: Any, constraints: Any) -> None:
        t0 = time.perf_counter()
        real_mask_rows(logits, constraints)
        clock["mask"] += time.perf_counter() - t0

    def step_time(_name: str, _rows: int, _tokens: int, seconds: float) -> None:
        clock["steps"] += seconds

    decode.mask_rows = timed_mask_rows  # type: ignore[assignment]
    served.engine.observer = step_time

    def run(constrained: int) -> tuple[float, int, float]:
        reqs = [
            GenRequest(
                input_ids=tuple(p),
                max_new_tokens=new_tokens,
                generation=GenerationConfig(do_sample=True, top_k=0),
                seed=i,
                # Free rows ignore EOS so every row decodes its full budget; constrained rows end
                # when their document is complete, so rates are per generated token.
                eos=frozenset(served.handler.eos_ids()) if i < constrained else frozenset(),
                constraint=grammar if i < constrained else None,
            )
            for i, p in enumerate(prompts)
        ]
        clock.update(mask=0.0, steps=0.0)
        started = time.perf_counter()
        items = [served.engine.submit(WorkItem(r)) for r in reqs]
        outs = [it.future.result(timeout=600) for it in items]
        seconds = time.perf_counter() - started
        generated = sum(len(o[0].token_ids) for o in outs)
        for r, o in zip(reqs, outs, strict=True):
            if r.constraint is not None and o[0].finish_reason == "stop":
                json.loads(tok.decode(o[0].token_ids, skip_special_tokens=True))
        return generated / seconds, generated, clock["mask"] / max(clock["steps"], 1e-9)

    try:
        run(rows)  # warm-up
        modes = {"free": 0, "half constrained": rows // 2, "all constrained": rows}
        rates: dict[str, list[float]] = {m: [] for m in modes}
        shares: dict[str, list[float]] = {m: [] for m in modes}
        tokens: dict[str, int] = {}
        for _ in range(rounds):
            for mode, n in modes.items():  # alternating, so drift on a shared host hits every mode alike
                rate, generated, share = run(n)
                rates[mode].append(rate)
                shares[mode].append(share)
                tokens[mode] = generated
    finally:
        decode.mask_rows = real_mask_rows  # type: ignore[assignment]
        served.stop()
    free = statistics.fmean(rates["free"])
    out: dict[str, Any] = {"rows": rows, "max_new_tokens": new_tokens, "rounds": rounds}
    for mode in modes:
        mean = statistics.fmean(rates[mode])
        out[mode] = {
            "tok_s": mean,
            "runs": rates[mode],
            "vs_free": mean / free,
            "mask_share_of_step_time": statistics.fmean(shares[mode]),
            "tokens_last_run": tokens[mode],
        }
    return out


def run(quick: bool = False) -> dict[str, Any]:
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()  # the 257-token document is longer than tiny-gpt2's 256

    from bench.models import byte_bpe_tokenizer, gpt2_124m_bpe

    rounds = 3 if quick else 7
    tokenizers = {
        "tiny-gpt2 (byte-level BPE, 512)": AutoTokenizer.from_pretrained(TINY_GPT2),
        "byte-level BPE 50k (trained on the stdlib)": byte_bpe_tokenizer(),
    }
    libraries = compare(tokenizers, rounds, samples=20 if quick else 60)
    worker: dict[str, Any] = {}
    for tname, tok in tokenizers.items():
        say(f"\n{tname}")
        worker[tname] = worker_costs(tok, rounds)
    engine: dict[str, Any] = {}
    say("\nengine: sampled rows, free vs constrained to the schema (alternating rounds)")
    engine["tiny-gpt2"] = _engine_rates(TINY_GPT2, rows=16, new_tokens=96, rounds=2 if quick else 4)
    if not quick:
        engine["gpt2-124m-bpe"] = _engine_rates(gpt2_124m_bpe(), rows=8, new_tokens=64, rounds=2)
    rows = [
        (model, r["rows"], mode, r[mode]["tok_s"], r[mode]["vs_free"], 100 * r[mode]["mask_share_of_step_time"])
        for model, r in engine.items()
        for mode in ("free", "half constrained", "all constrained")
    ]
    headers = ["model", "rows", "mode", "tok/s", "x free", "% of step time masking"]
    say(table("engine tokens/s (mean of alternating rounds)", headers, rows))
    payload = {"schema": SCHEMA, "document": DOCUMENT, "libraries": libraries, "worker": worker, "engine": engine}
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
