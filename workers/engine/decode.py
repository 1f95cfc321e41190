"""Continuous batching for causal language models, over transformers' ``DynamicCache``.

One thread owns the model and keeps one running batch: a left-padded KV cache, its attention mask, and
per row the next token and position. Between decode steps, waiting sequences are prefilled in groups
of similar length (little padding) and merged into the batch; finished rows leave at once and
all-padding columns are trimmed away. Every row keeps its own sampling state (processors, a seeded
generator), so a sequence's tokens do not depend on what it shares the batch with: greedy output
equals ``model.generate`` on that prompt alone.

The cache is a ``SlabCache`` (``workers.engine.kvcache``): preallocated per-layer buffers written in
place, instead of ``DynamicCache``'s concatenation of the whole cache at every step. Beam search has no
step-level form here: those requests run through ``model.generate`` between steps. Models with
sliding-window or hybrid attention keep the cache the model builds and are decoded one group at a
time, without merging.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessor

from queueformer.contract.errors import InvalidInput, OutOfMemory, TransientError
from workers.engine.constraint import Constraint, Grammar, mask_rows
from workers.engine.device import free_memory, is_oom
from workers.engine.item import WorkItem
from workers.engine.kvcache import ATTENTION, SlabCache, num_layers, plain_attention
from workers.engine.padding import pad_left, pad_token_id
from workers.engine.processors import RowDecoding, Scored, pick, prompt_scores, row_decoding

log = logging.getLogger(__name__)

StepObserver = Callable[[str, int, int, float], None]  # (model, batch rows, new tokens, seconds)


@dataclass(frozen=True)
class GenRequest:
    """A generate job, tokenised and with every generation parameter resolved."""

    input_ids: tuple[int, ...]
    max_new_tokens: int
    # The job's fields merged over the model's generation config (workers.engine.processors.resolve):
    # the engine's per-row processors and model.generate both decode from it.
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    stop: tuple[str, ...] = ()
    eos: frozenset[int] = frozenset()
    seed: int | None = None
    constraint: Grammar | None = None  # structured output: what every sequence must match
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k likeliest there
    prompt_logprobs: bool = False
    # Processors beyond generate's own (OpenAI penalties): stateless, given to every row and to generate as
    # its custom ``logits_processor``, which it runs after its own processors and before the warpers.
    logits_processors: tuple[LogitsProcessor, ...] = ()

    @property
    def do_sample(self) -> bool:
        return bool(self.generation.do_sample)

    @property
    def num_beams(self) -> int:
        return int(self.generation.num_beams or 1)

    @property
    def num_return_sequences(self) -> int:
        return int(self.generation.num_return_sequences or 1)

    def __post_init__(self) -> None:
        if self.constraint is not None and self.num_beams > 1:
            # Beams are reordered every step; one grammar state per beam would have to follow them.
            raise InvalidInput(
                "structured output cannot be combined with num_beams > 1", param=self.constraint.spec.field_name
            )


@dataclass
class GenOutput:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    stop_index: int | None = None  # where a stop string begins in the decoded text
    logprobs: list[Scored] | None = None  # per token, when the request asked for them
    prompt_logprobs: list[Scored | None] | None = None


@dataclass(eq=False)
class _Seq:
    item: WorkItem
    req: GenRequest
    index: int
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    stop_index: int | None = None
    emitted: int = 0  # characters already streamed
    generator: torch.Generator | None = None
    decoding: RowDecoding | None = None
    constraint: Constraint | None = None
    scored: list[Scored] = field(default_factory=list)
    prompt_scored: list[Scored | None] | None = None

    def __post_init__(self) -> None:
        if self.req.constraint is not None and self.constraint is None:
            self.constraint = self.req.constraint.constraint()

    @property
    def top_logprobs(self) -> int | None:
        return self.req.logprobs

    def ids(self) -> torch.Tensor:
        return torch.tensor([[*self.req.input_ids, *self.tokens]], dtype=torch.long)

    @property
    def length(self) -> int:
        return len(self.req.input_ids) + len(self.tokens)

    @property
    def final_length(self) -> int:
        return len(self.req.input_ids) + self.req.max_new_tokens

    def reset(self) -> None:
        """Back to the prompt (after an OOM eviction): same seed, so the same tokens come again."""
        self.tokens.clear()
        self.scored.clear()
        self.emitted = 0
        self.generator = _generator(self.req, self.index)
        if self.constraint is not None:
            self.constraint.reset()


def _generator(req: GenRequest, index: int) -> torch.Generator | None:
    if not req.do_sample:
        return None
    g = torch.Generator()
    seed = req.seed if req.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    # The first sequence draws as ``torch.manual_seed(seed); model.generate(...)`` draws for one prompt.
    g.manual_seed(seed if index == 0 else (seed * 1_000_003 + index) % (2**63 - 1))
    return g


@dataclass
class _Part:
    """Rows with their cache, mask, next token and position: a prefilled group, or the running batch."""

    rows: list[_Seq]
    cache: Any
    mask: torch.Tensor
    next: torch.Tensor
    pos: torch.Tensor


class _Group:
    """The sequences of one request; resolves the item once all are done."""

    def __init__(self, item: WorkItem, n: int) -> None:
        self.item = item
        self.outputs: list[GenOutput | None] = [None] * n

    def done(self, seq: _Seq) -> None:
        assert seq.finish is not None
        logprobs = list(seq.scored) if seq.req.logprobs is not None else None
        self.outputs[seq.index] = GenOutput(list(seq.tokens), seq.finish, seq.stop_index, logprobs, seq.prompt_scored)
        if all(o is not None for o in self.outputs):
            self.item.resolve(list(self.outputs))


class DecodeEngine:
    """The continuous-batching loop for one causal LM."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        max_batch_size: int,
        max_batch_tokens: int,
        kv_cache_tokens: int,
        beam_search: Callable[[GenRequest], list[GenOutput]],
        poll_steps: int = 8,
        observer: StepObserver | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.kv_cache_tokens = kv_cache_tokens
        self.beam_search = beam_search
        self.poll_steps = poll_steps
        self.observer = observer
        self.device = model.get_input_embeddings().weight.device
        self.pad_id = pad_token_id(tokenizer, model.config)

        self._inbox: queue.SimpleQueue[WorkItem | None] = queue.SimpleQueue()
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._groups: dict[int, _Group] = {}
        self._rows: list[_Seq] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._next: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._cap = max_batch_size  # lowered after an OOM, raised back as steps succeed
        self._ok_steps = 0
        self._steps = 0
        self._mergeable = plain_attention(model.config)
        self._layers = num_layers(model.config) if self._mergeable else 0
        if self._mergeable and getattr(model.config, "_attn_implementation", None) == "sdpa":
            model.set_attn_implementation(ATTENTION)
        if not self._mergeable:
            log.warning("%s: sliding-window or hybrid attention; decoding one group at a time", name)
        self._stopping = False
        self.fatal: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=f"decode-{name}", daemon=True)
        self._thread.start()

    # --- public ---------------------------------------------------------------------------------

    def submit(self, item: WorkItem) -> WorkItem:
        self._inbox.put(item)
        return item

    def stop(self) -> None:
        """Stop the loop; anything still pending fails as transient, so its message is run again elsewhere."""
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout=30)
        pending = [s.item for s in [*self._rows, *self._waiting]]
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                pending.append(item)
        for item in pending:
            item.reject(TransientError(f"the {self.name} engine stopped before this finished"))

    @property
    def running(self) -> int:
        return len(self._rows)

    # --- loop -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self._pull(block=not self._rows and not self._waiting)
                if self._steps % self.poll_steps == 0:
                    self._check_stops()
                if self._waiting and len(self._rows) < self._cap and (not self._rows or self._mergeable):
                    self._admit()
                if self._rows:
                    self._step()
            except BaseException as exc:  # never strand the task threads waiting on futures
                log.exception("decode engine %s failed", self.name)
                self.fatal = exc
                for seq in [*self._rows, *self._waiting]:
                    seq.item.reject(exc)
                self._rows, self._cache, self._mask = [], None, None
                self._waiting.clear()
                self._groups.clear()

    def _pull(self, block: bool) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if item is None:
                self._stopping = True
                return
            req: GenRequest = item.prepared
            reason = item.stop_reason()
            if reason is not None:
                item.reject(reason)
                continue
            if req.num_beams > 1:
                self._run_beams(item)
                continue
            self._groups[id(item)] = _Group(item, req.num_return_sequences)
            for i in range(req.num_return_sequences):
                decoding = row_decoding(
                    self.model, req.generation, len(req.input_ids), self.device, req.logits_processors
                )
                self._waiting.append(
                    _Seq(
                        item=item,
                        req=req,
                        index=i,
                        generator=_generator(req, i),
                        decoding=decoding if decoding.processors or decoding.criteria else None,
                    )
                )

    def _run_beams(self, item: WorkItem) -> None:
        try:
            item.resolve(self.beam_search(item.prepared))
        except Exception as exc:
            if is_oom(exc):
                free_memory()
                exc = OutOfMemory(f"out of memory running beam search on {self.name}")
            item.reject(exc)

    def _check_stops(self) -> None:
        for seq in [*self._rows, *self._waiting]:
            if seq.finish is None and not seq.item.future.done():
                reason = seq.item.stop_reason()
                if reason is not None:
                    seq.item.reject(reason)
        # Rows of rejected items leave at the next retire; waiting ones are dropped now.
        self._waiting = collections.deque(s for s in self._waiting if not s.item.future.done())
        if any(s.item.future.done() and s.finish is None for s in self._rows):
            for s in self._rows:
                if s.item.future.done() and s.finish is None:
                    s.finish = "cancelled"
            self._retire()

    # --- admission and prefill -----------------------------------------------------------------

    def _admit(self) -> None:
        room = self._cap - len(self._rows)
        picked: list[_Seq] = []
        longest = max((s.final_length for s in self._rows), default=0)
        while self._waiting and len(picked) < room:
            cand = self._waiting[0]
            new_longest = max(longest, cand.final_length)
            if picked and (len(self._rows) + len(picked) + 1) * new_longest > self.kv_cache_tokens:
                break
            picked.append(self._waiting.popleft())
            longest = new_longest
        if not picked:
            return
        picked.sort(key=lambda s: len(s.req.input_ids))
        groups = self._prefill_groups(picked)
        if not self._mergeable:
            # Unmergeable caches decode one group at a time; the rest go back to the front.
            for s in reversed([s for g in groups[1:] for s in g]):
                self._waiting.appendleft(s)
            groups = groups[:1]
        parts: list[_Part] = []
        for group in groups:
            parts.extend(self._prefill(group))
        if parts:
            self._join(parts)
            self._retire()

    def _prefill_groups(self, seqs: list[_Seq]) -> list[list[_Seq]]:
        """Cut length-sorted sequences into groups with little padding and bounded prefill tokens."""
        groups: list[list[_Seq]] = []
        current: list[_Seq] = []
        for s in seqs:
            n = len(s.req.input_ids)
            if current:
                shortest = len(current[0].req.input_ids)
                if (len(current) + 1) * n > self.max_batch_tokens or n > shortest * 1.25 + 4:
                    groups.append(current)
                    current = []
            current.append(s)
        if current:
            groups.append(current)
        return groups

    def _prefill(self, group: list[_Seq]) -> list[_Part]:
        """Prefill one group (splitting it on OOM) and pick each row's first token."""
        ids, mask = pad_left([s.req.input_ids for s in group], self.pad_id, self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        echo = any(s.req.prompt_logprobs for s in group)
        for s in group:
            if s.decoding is not None:
                s.decoding.start()
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=pos,
                    past_key_values=SlabCache(self._layers) if self._mergeable else None,
                    use_cache=True,
                    logits_to_keep=0 if echo else 1,  # 0: every position, to score the prompt
                )
        except Exception as exc:
            if not is_oom(exc):
                raise
            free_memory()
            if len(group) == 1:
                self._fail(group[0], OutOfMemory(f"out of memory prefilling this prompt alone on {self.name}"))
                return []
            half = len(group) // 2
            return self._prefill(group[:half]) + self._prefill(group[half:])
        for i, s in enumerate(group):
            if s.req.prompt_logprobs:
                n = len(s.req.input_ids)
                s.prompt_scored = prompt_scores(out.logits[i, -n:], s.req.input_ids, s.req.logprobs or 0)
        nxt = self._select(group, out.logits[:, -1, :].float())
        next_ids = torch.tensor(nxt, dtype=torch.long, device=self.device)
        return [_Part(group, out.past_key_values, mask, next_ids, mask.sum(-1).to(torch.long))]

    def _join(self, parts: list[_Part]) -> None:
        """Add prefilled groups to the running batch with one copy of the cache, sized for the whole run."""
        if self._rows:
            assert self._mask is not None and self._next is not None and self._pos is not None
            parts = [_Part(self._rows, self._cache, self._mask, self._next, self._pos), *parts]
        if len(parts) == 1:
            p = parts[0]
            self._rows, self._cache, self._mask, self._next, self._pos = list(p.rows), p.cache, p.mask, p.next, p.pos
            return
        width = max(p.mask.shape[1] for p in parts)
        longest = max(s.final_length for p in parts for s in p.rows)
        self._cache = SlabCache.merged([p.cache for p in parts], headroom=max(8, longest - width))
        self._mask = torch.cat([F.pad(p.mask, (width - p.mask.shape[1], 0)) for p in parts], dim=0)
        self._next = torch.cat([p.next for p in parts])
        self._pos = torch.cat([p.pos for p in parts])
        self._rows = [s for p in parts for s in p.rows]

    # --- decoding ---------------------------------------------------------------------------------

    def _step(self) -> None:
        assert self._mask is not None and self._next is not None and self._pos is not None
        started = time.perf_counter()
        mask = F.pad(self._mask, (0, 1), value=1)
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=self._next[:, None],
                    attention_mask=mask,
                    position_ids=self._pos[:, None],
                    past_key_values=self._cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        except Exception as exc:
            if not is_oom(exc):
                raise
            self._on_step_oom()
            return
        self._mask = mask
        self._cache = out.past_key_values
        rows = len(self._rows)
        nxt = self._select(self._rows, out.logits[:, -1, :].float())
        self._next = torch.tensor(nxt, dtype=torch.long, device=self.device)
        self._pos = self._pos + 1
        self._steps += 1
        self._ok_steps += 1
        if self._cap < self.max_batch_size and self._ok_steps >= 32:
            self._cap = min(self.max_batch_size, self._cap * 2)
            self._ok_steps = 0
        self._retire()
        if self.observer is not None:
            self.observer(self.name, rows, rows, time.perf_counter() - started)

    def _on_step_oom(self) -> None:
        """Evict the newest half back to the queue and lower the batch cap; alone, the sequence fails."""
        free_memory()
        if len(self._rows) == 1:
            self._fail(self._rows[0], OutOfMemory(f"out of memory decoding this sequence alone on {self.name}"))
            self._rows[0].finish = "cancelled"
            self._retire()
            return
        keep = len(self._rows) // 2
        evicted = self._rows[keep:]
        for s in reversed(evicted):
            s.reset()
            self._waiting.appendleft(s)
        self._cap = max(1, keep)
        self._ok_steps = 0
        self._select_rows(list(range(keep)))
        log.warning("%s: OOM in a decode step; batch cut to %d rows", self.name, keep)

    def _select(self, seqs: list[_Seq], logits: torch.Tensor) -> list[int]:
        """Pick each row's next token, append it and mark rows that finish."""
        # Structured output first, so every processor (penalties, top-k/top-p) works on allowed tokens only.
        mask_rows(logits, [s.constraint for s in seqs])
        chosen, scored = pick(logits, seqs)
        for s, sc in zip(seqs, scored, strict=True):
            if sc is not None:
                s.scored.append(sc)
        for s, tok in zip(seqs, chosen, strict=True):
            self._append(s, tok)
        return list(chosen)

    def _append(self, s: _Seq, tok: int) -> None:
        s.tokens.append(tok)
        if s.constraint is not None and not s.constraint.accept(tok):
            self._fail(s, s.constraint.failure(tok))
            s.finish = "cancelled"
            return
        if tok in s.req.eos or (s.req.stop and self._hit_stop(s)) or (s.constraint is not None and s.constraint.done):
            s.finish = "stop"
        elif len(s.tokens) >= s.req.max_new_tokens:
            s.finish = "length"
        elif s.decoding is not None and s.decoding.criteria and s.decoding.stopped(s.ids(), torch.empty(0)):
            s.finish = "length"  # a budget other than tokens ran out (max_time)
        if s.item.on_token is not None:
            text = self.tokenizer.decode(s.tokens, skip_special_tokens=True)
            end = s.stop_index if s.stop_index is not None else len(text)
            # Hold back a trailing replacement char: the next token may complete a multi-byte character.
            if s.finish is None and text.endswith("\ufffd"):
                end = min(end, len(text) - 1)
            if end > s.emitted:
                s.item.on_token(s.index, tok, text[s.emitted : end])
                s.emitted = end

    def _hit_stop(self, s: _Seq) -> bool:
        window = 2 * max(len(x) for x in s.req.stop) + 4
        tail = self.tokenizer.decode(s.tokens[-window:], skip_special_tokens=True)
        if not any(x in tail for x in s.req.stop):
            return False
        text = self.tokenizer.decode(s.tokens, skip_special_tokens=True)
        hits = [text.find(x) for x in s.req.stop if x in text]
        s.stop_index = min(hits) if hits else None
        return True

    def _retire(self) -> None:
        done = [i for i, s in enumerate(self._rows) if s.finish is not None]
        if not done:
            return
        for i in done:
            s = self._rows[i]
            group = self._groups.get(id(s.item))
            if group is not None and s.finish != "cancelled":
                group.done(s)
                if s.item.future.done():
                    self._groups.pop(id(s.item), None)
            elif s.item.future.done():
                self._groups.pop(id(s.item), None)
        keep = [i for i, s in enumerate(self._rows) if s.finish is None]
        self._select_rows(keep)

    def _select_rows(self, keep: list[int]) -> None:
        if not keep:
            self._rows, self._cache, self._mask, self._next, self._pos = [], None, None, None, None
            return
        assert self._mask is not None and self._next is not None and self._pos is not None
        if len(keep) < len(self._rows):
            idx = torch.tensor(keep, device=self.device)
            self._cache.batch_select_indices(idx)
            self._mask = self._mask.index_select(0, idx)
            self._next = self._next.index_select(0, idx)
            self._pos = self._pos.index_select(0, idx)
            self._rows = [self._rows[i] for i in keep]
        # Drop leading columns that are padding in every remaining row.
        lead = int((self._mask.sum(0) == 0).long().cumprod(0).sum().item())
        if lead and self._mergeable:
            self._mask = self._mask[:, lead:]
            self._cache.trim_left(lead)

    def _fail(self, seq: _Seq, exc: BaseException) -> None:
        seq.item.reject(exc)
        self._groups.pop(id(seq.item), None)


__all__ = ["DecodeEngine", "GenOutput", "GenRequest"]
