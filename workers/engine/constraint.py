"""Structured output: a grammar per row of the decode engine, enforced token by token with llguidance.

A generate request may ask that its output match a JSON schema, be any JSON object, match a regex,
or be one of a list of strings (``ConstraintSpec``). The worker compiles that once per (tokenizer,
spec) into a ``Grammar`` (``Grammars``: an LRU of compiled grammars per tokenizer) while the job is
preprocessed, so a spec the library refuses is an ``InvalidInput`` there, never an error inside the
decode loop. Each sequence then follows its own ``Constraint``: before a token is chosen, the tokens
the grammar does not allow next are set to -inf in that row's logits (``mask_rows`` does many rows
at once); the chosen token is accepted; the row must stop (finish_reason "stop") once the grammar is
complete and nothing but EOS could follow. EOS is allowed exactly where the grammar may end.

llguidance was picked over xgrammar and outlines-core by measurement (``bench/structured.py``;
docs/benchmarks.md, "Structured output"): it was the only one of the three whose sampled outputs
all parsed and validated, it compiles a schema in milliseconds, and it refuses what it does not
implement instead of relaxing it.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch

from queueformer.contract.errors import InternalError, InvalidInput, QueueformerError
from queueformer.contract.jobs import GenerateJob

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # a TypedDict that exists in the stubs only

Kind = Literal["json_schema", "json_object", "regex", "choice"]
KINDS: tuple[Kind, ...] = ("json_schema", "json_object", "regex", "choice")
# The request field each kind comes from, named in errors unless the handler names another.
_PARAMS: dict[str, str] = {
    "json_schema": "json_schema",
    "json_object": "response_format",
    "regex": "regex",
    "choice": "choice",
}


@dataclass(frozen=True)
class ConstraintSpec:
    """What one generate request's output must match. Hashable: compiled grammars are cached by it.

    ``schema`` is the JSON schema as compact JSON text (``ConstraintSpec.json_schema`` makes it).
    ``strict`` follows OpenAI's ``json_schema.strict``: strict schemas are enforced exactly, and one
    using a keyword the grammar cannot enforce is refused; a non-strict one is enforced as far as it
    can be, unsupported keywords ignored (OpenAI does not enforce non-strict schemas at all).
    ``param`` names the request field in errors.
    """

    kind: Kind
    schema: str | None = None
    strict: bool = True
    pattern: str | None = None
    choices: tuple[str, ...] = ()
    param: str | None = field(default=None, compare=False)

    @classmethod
    def json_schema(
        cls, schema: Mapping[str, Any] | str, *, strict: bool = True, param: str | None = None
    ) -> ConstraintSpec:
        """A JSON-schema spec; the schema is parsed and written back compactly, so one schema sent with
        different whitespace shares a grammar."""
        name = param or _PARAMS["json_schema"]
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidInput(f"the JSON schema is not valid JSON: {exc}", param=name) from exc
        if not isinstance(schema, Mapping):
            raise InvalidInput("a JSON schema must be a JSON object", param=name)
        # Written back compactly but in its own key order: properties are generated in the order listed.
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        return cls(kind="json_schema", schema=text, strict=strict, param=name)

    @classmethod
    def json_object(cls, *, param: str | None = None) -> ConstraintSpec:
        return cls(kind="json_object", param=param or _PARAMS["json_object"])

    @classmethod
    def regex(cls, pattern: str, *, param: str | None = None) -> ConstraintSpec:
        return cls(kind="regex", pattern=pattern, param=param or _PARAMS["regex"])

    @classmethod
    def choice(cls, choices: Iterable[str], *, param: str | None = None) -> ConstraintSpec:
        return cls(kind="choice", choices=tuple(choices), param=param or _PARAMS["choice"])

    @property
    def field_name(self) -> str:
        return self.param or _PARAMS[self.kind]

    @classmethod
    def of_job(cls, job: GenerateJob) -> ConstraintSpec | None:
        """The spec a generate job's ``json_schema``, ``regex``, ``choice`` or ``response_format`` asks for."""
        if job.json_schema is not None:
            return cls.json_schema(job.json_schema, strict=True, param="json_schema")
        if job.regex is not None:
            return cls.regex(job.regex)
        if job.choice is not None:
            return cls.choice(job.choice)
        fmt = job.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.json_schema is None:
            return cls.json_object(param="response_format")
        return cls.json_schema(
            fmt.json_schema.schema_, strict=bool(fmt.json_schema.strict), param="response_format.json_schema.schema"
        )


def _grammar_text(spec: ConstraintSpec) -> str:
    """The llguidance grammar of a spec. JSON is written compactly, without free whitespace, so a
    model cannot stall in an endless run of spaces or newlines."""
    if spec.kind == "json_schema":
        options: JsonCompileOptions = {"whitespace_flexible": False, "lenient": not spec.strict}
        return llguidance.LLMatcher.grammar_from_json_schema(spec.schema or "{}", defaults=options)
    if spec.kind == "json_object":
        compact: JsonCompileOptions = {"whitespace_flexible": False}
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=compact)
    if spec.kind == "regex":
        if not spec.pattern:
            raise InvalidInput("the regex is empty", param=spec.field_name)
        return llguidance.LLMatcher.grammar_from_regex(spec.pattern)
    if spec.kind == "choice":
        if not spec.choices:
            raise InvalidInput("choice needs at least one string", param=spec.field_name)
        # Lark string literals take JSON's escapes, so json.dumps quotes any string safely.
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in dict.fromkeys(spec.choices))
        )
    raise InvalidInput(f"unknown constraint kind {spec.kind!r}; expected one of {', '.join(KINDS)}", param="kind")


@dataclass(frozen=True, eq=False)
class Grammar:
    """A spec compiled for one tokenizer; each sequence that follows it gets its own ``Constraint``."""

    spec: ConstraintSpec
    width: int  # the model's logits width
    mask_width: int  # tokens the bitmask covers: the larger of the logits width and the tokenizer's size
    stop_ids: tuple[int, ...]
    template: Any = field(repr=False)  # an llguidance.LLMatcher at the start, its lexer already built
    _copying: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def matcher(self) -> Any:
        with self._copying:
            return self.template.deep_copy()

    def constraint(self) -> Constraint:
        return Constraint(self)


class Grammars:
    """Compiles specs against one tokenizer, each once: an LRU of compiled grammars, safe across threads.

    ``width`` is the model's logits width, which may differ from the tokenizer's size: columns the
    tokenizer has no token for (padding rows of the output layer) are never allowed. ``stop_ids``
    are the model's EOS tokens: allowed exactly where the grammar may end.
    """

    def __init__(self, tokenizer: Any, *, width: int, stop_ids: Iterable[int], cache_size: int = 256) -> None:
        self.width = width
        self.stop_ids = tuple(sorted({int(i) for i in stop_ids}))
        self.mask_width = max(width, len(tokenizer))
        self._tokenizer = tokenizer
        self._setup = threading.Lock()
        self._lltok: Any = None
        self.compile = functools.lru_cache(maxsize=cache_size)(self._compile)

    def _llguidance_tokenizer(self, param: str) -> Any:
        # Reading a 50k vocabulary takes about a second: done on the first constrained request only.
        with self._setup:
            if self._lltok is None:
                try:
                    self._lltok = llguidance.hf.from_tokenizer(
                        self._tokenizer, n_vocab=self.mask_width, eos_token=list(self.stop_ids)
                    )
                except ValueError as exc:  # e.g. a slow (Python) tokenizer
                    raise InvalidInput(
                        f"structured output is not available for this model: {exc}", param=param
                    ) from exc
            return self._lltok

    def _compile(self, spec: ConstraintSpec) -> Grammar:
        param = spec.field_name
        if not self.stop_ids:
            raise InvalidInput(
                "this model has no end-of-sequence token, so constrained output could not end", param=param
            )
        lltok = self._llguidance_tokenizer(param)
        try:
            text = _grammar_text(spec)
        except ValueError as exc:
            raise InvalidInput(f"the {spec.kind.replace('_', ' ')} was refused: {exc}", param=param) from exc
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, lltok)
        if is_error:
            raise InvalidInput(f"the {spec.kind.replace('_', ' ')} was refused: {_first_line(messages)}", param=param)
        template = llguidance.LLMatcher(lltok, text, log_level=0)
        # The first mask builds the lexer the copies share; an unsatisfiable schema shows up here.
        probe = llguidance.torch.allocate_token_bitmask(1, self.mask_width)
        llguidance.torch.fill_next_token_bitmask(template, probe, 0)
        if template.is_error() or not probe.any():
            raise InvalidInput(
                f"the {spec.kind.replace('_', ' ')} was refused: {_first_line([template.get_error()])}", param=param
            )
        return Grammar(spec, self.width, self.mask_width, self.stop_ids, template)


def _first_line(messages: Sequence[str]) -> str:
    """The library's first message on one line (regex errors span several, with a caret under the spot)."""
    text = next((m for m in messages if m), "no output can satisfy it")
    lines = [line.strip() for line in text.strip().splitlines()]
    return " ".join(line for line in lines if line and not re.match(r"^\d+ \| ", line))[:500]


# --- per row ----------------------------------------------------------------------------------------


class Constraint:
    """One sequence's place in its grammar: masks its logits, accepts its tokens, says when it must stop."""

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        self.matcher = grammar.matcher()
        self.done = False

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-token bitmask of the current state into ``bitmask[row]`` (int32, CPU)."""
        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, row)

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Set the tokens the grammar does not allow next to -inf, in place, in one row's scores [1, width]."""
        mask_rows(scores, [self])
        return scores

    def accept(self, token: int) -> bool:
        """Advance past the chosen token. False if the grammar refused it; the row cannot go on then."""
        ok = bool(self.matcher.consume_token(int(token))) and not self.matcher.is_error()
        # Stopped: the grammar is complete and nothing but EOS may follow (or EOS was just taken).
        self.done = not ok or bool(self.matcher.is_stopped())
        return ok

    def failure(self, token: int) -> QueueformerError:
        """The error for a row whose token the grammar refused (``accept`` returned False)."""
        reason = self.matcher.get_error() if self.matcher.is_error() else ""
        if "too complex" in reason.lower() or "limit" in reason.lower():
            return InvalidInput(
                f"the {self.grammar.spec.kind.replace('_', ' ')} is too complex to enforce: {_first_line([reason])}",
                param=self.grammar.spec.field_name,
            )
        return InternalError(f"token {token} broke the output's grammar: {_first_line([reason or 'refused'])}")

    def reset(self) -> None:
        """Back to the start of the grammar (the engine restarts a row from its prompt after an OOM)."""
        self.matcher = self.grammar.matcher()
        self.done = False


_executor: Any = None


def _parallel() -> Any:
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    return _executor


def mask_rows(logits: torch.Tensor, rows: Sequence[Constraint | None]) -> None:
    """Mask every constrained row of ``logits`` [rows, width] in place; rows without a constraint are untouched.

    The bitmasks are computed on the CPU (several rows at once on llguidance's thread pool) and applied
    where the logits are.
    """
    idx = [i for i, c in enumerate(rows) if c is not None]
    if not idx:
        return
    cons = [c for c in rows if c is not None]
    words = (cons[0].grammar.mask_width + 31) // 32
    bitmask = torch.empty((len(rows), words), dtype=torch.int32)
    if len(cons) == 1:
        cons[0].fill(bitmask, idx[0])
    else:
        llguidance.torch.fill_next_token_bitmask_par(
            _parallel(), [(c.matcher, i) for c, i in zip(cons, idx, strict=True)], bitmask
        )
    apply_bitmask(logits, bitmask, idx)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """-inf wherever ``bitmask[row]`` has a 0 bit (token id = 32 * word + bit), for the given rows.

    Logits columns past the bitmask are blocked too. NumPy on the CPU: single-threaded and without
    torch's per-op thread pool, which costs more than the work at this size.
    """
    k, cols = len(rows), logits.shape[-1]
    span = min(cols, bitmask.shape[-1] * 32)
    with torch.inference_mode():  # the engine's logits are inference tensors
        if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64, torch.float16):
            bits = np.unpackbits(bitmask.numpy()[list(rows)].view(np.uint8), axis=-1, bitorder="little")
            blocked = bits[:, :span] == 0
            arr = logits.numpy()
            for j, i in enumerate(rows):
                np.copyto(arr[i, :span], -np.inf, where=blocked[j])
                arr[i, span:] = -np.inf
            return
        shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        words = bitmask[list(rows)].to(logits.device, non_blocking=True)
        allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(k, -1)[:, :span].bool()
        index = torch.tensor(list(rows), device=logits.device)
        picked = logits.index_select(0, index)
        picked[:, :span].masked_fill_(~allowed, float("-inf"))
        picked[:, span:] = float("-inf")
        logits.index_copy_(0, index, picked)


__all__ = ["KINDS", "Constraint", "ConstraintSpec", "Grammar", "Grammars", "apply_bitmask", "mask_rows"]
