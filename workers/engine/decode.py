"""Continuous batching for causal language models, over transformers' ``DynamicCache``.

The engine keeps one running batch (a left-padded KV cache, its attention mask, and per row the next
token and position); the worker's lane (``workers.engine.lane``) runs its turns, one decode step
each. Between decode steps, waiting sequences are prefilled in groups of similar length (little
padding) and merged into the batch; finished rows leave at once and all-padding columns are trimmed
away. Every row keeps its own sampling state (processors, a seeded generator), so a sequence's tokens
do not depend on what it shares the batch with: greedy output equals ``model.generate`` on that prompt
alone.

The cache is a ``SlabCache`` (``workers.engine.kvcache``): preallocated per-layer buffers written in
place, instead of ``DynamicCache``'s concatenation of the whole cache at every step. Beam search has no
step-level form here: those requests run through ``model.generate`` between steps. Models with
sliding-window or hybrid attention keep the cache the model builds and are decoded one group at a
time, without merging. With ``static_decode`` the decode step runs on static shapes over the same
slabs and, on a GPU, is replayed as a CUDA graph (``workers.engine.static_step``).
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessor

from queueformer.contract.errors import InvalidInput, OutOfMemory, TransientError
from workers.engine.attention import ATTENTION, take_packed_calls
from workers.engine.constraint import Constraint, Grammar, mask_rows
from workers.engine.device import free_memory, is_oom
from workers.engine.item import WorkItem, begin
from workers.engine.kvcache import SlabCache, cache_argument, num_layers, plain_attention, returned_cache
from workers.engine.lane import Lane
from workers.engine.padding import pad_left, pad_token_id
from workers.engine.prefix import PrefixKV, PrefixObserver, PrefixReuse, Share
from workers.engine.processors import RowDecoding, Scored, pick, prompt_scores, row_decoding
from workers.engine.static_step import StaticStep

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
        prefix_cache_tokens: int = 0,
        prefix_observer: PrefixObserver | None = None,
        static_decode: str = "off",
        lane: Lane | None = None,
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
        self._cache_arg = cache_argument(model)

        self._inbox: queue.SimpleQueue[WorkItem] = queue.SimpleQueue()
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
        self.admissions = 0  # prefill-and-join rounds: each copies the running cache
        self._mergeable = plain_attention(model.config)
        self._layers = num_layers(model.config) if self._mergeable else 0
        if self._mergeable and getattr(model.config, "_attn_implementation", None) == "sdpa":
            model.set_attn_implementation(ATTENTION)
        # Prompts are prefilled packed (one sequence, no padding) where the engine's attention runs.
        self._packs = self._mergeable and getattr(model.config, "_attn_implementation", None) == ATTENTION
        if not self._mergeable:
            log.warning("%s: sliding-window or hybrid attention; decoding one group at a time", name)
        # Prefix reuse copies keys and values between rows: only for caches the engine owns (slabs).
        self.prefix: PrefixReuse | None = (
            PrefixReuse(name, prefix_cache_tokens, prefix_observer)
            if self._mergeable and prefix_cache_tokens > 0
            else None
        )
        # Decode steps on static shapes (CUDA graphs on a GPU) run on the slab cache: mergeable models only.
        self._static = (
            StaticStep.build(model, static_decode, pad_id=self.pad_id, name=name) if self._mergeable else None
        )
        self._stopping = False
        self.fatal: BaseException | None = None
        # The worker's lane runs this engine's steps with its other engines'; alone, it gets its own.
        self._own_lane = lane is None
        self.lane = lane if lane is not None else Lane(f"decode-{name}")
        self.lane.add(self)

    # --- public ---------------------------------------------------------------------------------

    def submit(self, item: WorkItem) -> WorkItem:
        self._inbox.put(item)
        self.lane.wake()
        return item

    def stop(self) -> None:
        """Leave the lane; anything still pending fails as transient, so its message is run again elsewhere."""
        self._stopping = True
        self.lane.remove(self)
        if self._own_lane:
            self.lane.stop()
        pending = [s.item for s in [*self._rows, *self._waiting]]
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            pending.append(item)
        for item in pending:
            item.reject(TransientError(f"the {self.name} engine stopped before this finished"))

    @property
    def packs(self) -> bool:
        """True while prompts are prefilled packed (see ``_prefill_pack``)."""
        return self._packs

    @property
    def running(self) -> int:
        return len(self._rows)

    def _should_admit(self) -> bool:
        """Admit when there is room, but not a row or two at a time into a large running batch.

        Joining copies the whole cache, so rows wait until an eighth of the batch they would make is
        free (or every waiting row fits): a few steps' delay for those rows instead of a copy of every
        row per step. Room counts both the batch cap and the KV budget: where the budget binds first,
        rows free up one or two a step, and admitting each alone cost more than the decoding itself.
        """
        live = len(self._rows)
        if not self._waiting or self._cap - live <= 0 or (self._rows and not self._mergeable):
            return False
        room = self._admissible()
        if live == 0 or room >= len(self._waiting) or room >= max(1, (live + room) // 8):
            return True
        # more urgent work than anything running joins at once
        return room > 0 and self._waiting[0].item.priority > min(s.item.priority for s in self._rows)

    def _admissible(self) -> int:
        """How many rows from the front of the queue join now: the batch cap and the KV budget (rows x the
        longest final length, prefixes kept for reuse included) both hold; into an empty batch, the first
        row joins whatever its length (alone, it runs on its own budget)."""
        live = len(self._rows)
        room = self._cap - live
        longest = max((s.final_length for s in self._rows), default=0)
        budget = self.kv_cache_tokens - (self.prefix.tokens if self.prefix is not None else 0)
        n = 0
        for cand in itertools.islice(self._waiting, max(0, room)):
            longest = max(longest, cand.final_length)
            if (n or live) and (live + n + 1) * longest > budget:
                break
            n += 1
        return n

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_tokens(self) -> int:
        """Token positions the running batch holds in its cache (rows x width); read from other threads."""
        mask = self._mask
        return int(mask.shape[0] * mask.shape[1]) if mask is not None else 0

    # --- loop -----------------------------------------------------------------------------------

    def ready(self) -> bool:
        return not self._stopping and bool(self._rows or self._waiting or not self._inbox.empty())

    def turn(self) -> None:
        """Take what was submitted, admit what fits, and run one decode step (on the lane's thread)."""
        try:
            self._pull()
            if self._steps % self.poll_steps == 0:
                self._check_stops()
            if self._waiting and self._rows and self._mergeable:
                self._preempt()
            if self._should_admit():
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

    def _pull(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
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
            seqs = []
            for i in range(req.num_return_sequences):
                decoding = row_decoding(
                    self.model, req.generation, len(req.input_ids), self.device, req.logits_processors
                )
                seqs.append(
                    _Seq(
                        item=item,
                        req=req,
                        index=i,
                        generator=_generator(req, i),
                        decoding=decoding if decoding.processors or decoding.criteria else None,
                    )
                )
            self._wait(seqs)

    def _wait(self, seqs: list[_Seq]) -> None:
        """Queue sequences by priority, then arrival: behind every waiting one of at least their priority.

        The next admission takes the front, so an urgent job waits for at most one admission however many
        batch lines wait before it.
        """
        priority = seqs[0].item.priority
        if not self._waiting or self._waiting[-1].item.priority >= priority:
            self._waiting.extend(seqs)
            return
        at = next(i for i, s in enumerate(self._waiting) if s.item.priority < priority)
        for offset, seq in enumerate(seqs):
            self._waiting.insert(at + offset, seq)

    def _run_beams(self, item: WorkItem) -> None:
        begin([item])
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
        live = len(self._rows)
        if any(s.item.alone for s in self._rows):
            return  # a suspect of earlier crashes runs alone until it finishes
        suspect = next((s.item for s in self._waiting if s.item.alone), None)
        if suspect is not None:
            if live:
                return  # let the running batch drain, then run the suspect alone
            alone = [s for s in self._waiting if s.item is suspect]
            self._waiting = collections.deque(s for s in self._waiting if s.item is not suspect)
            self._prefill_and_join(alone)
            return
        picked = [self._waiting.popleft() for _ in range(self._admissible())]
        if picked:
            self._prefill_and_join(picked)

    def _prefill_and_join(self, picked: list[_Seq]) -> None:
        self.admissions += 1
        begin(list({id(s.item): s.item for s in picked}.values()))
        picked.sort(key=lambda s: len(s.req.input_ids))
        parts: list[_Part] = []
        if self.prefix is not None:
            # rows that score their prompt need logits at every prompt position: prefilled whole
            whole = [s for s in picked if s.req.prompt_logprobs]
            shares, picked = self.prefix.plan([s for s in picked if not s.req.prompt_logprobs], self._rows)
            picked = sorted(picked + whole, key=lambda s: len(s.req.input_ids))
            for share in shares:
                parts.extend(self._prefill_share(share))
        if self._packs:
            # rows that score their prompt need logits at every position: prefilled in padded groups
            parts.extend(self._prefill_packed([s for s in picked if not s.req.prompt_logprobs]))
            picked = [s for s in picked if s.req.prompt_logprobs]
        groups = self._prefill_groups(picked)
        if not self._mergeable:
            # Unmergeable caches decode one group at a time; the rest go back to the front.
            for s in reversed([s for g in groups[1:] for s in g]):
                self._waiting.appendleft(s)
            groups = groups[:1]
        for group in groups:
            parts.extend(self._prefill(group))
        if parts:
            self._join(parts)
            self._retire()

    def _preempt(self) -> None:
        """Make room for waiting rows of a higher priority than running ones when the batch is full.

        The running rows of the lowest priority with the fewest tokens go back to waiting and start over
        from their prompt later (same seed, same tokens), so an urgent job is admitted at the next step
        instead of after the longest running line. Streamed rows are never taken back: their tokens
        have been sent.
        """
        live = self._rows
        room = self._cap - len(live)
        urgent = self._waiting[0].item.priority
        if room > 0 or not live or urgent <= min(s.item.priority for s in live):
            return
        want = sum(1 for s in itertools.takewhile(lambda s: s.item.priority == urgent, self._waiting))
        victims = sorted(
            (i for i, s in enumerate(self._rows) if s.item.priority < urgent and s.item.on_token is None),
            key=lambda i: (self._rows[i].item.priority, len(self._rows[i].tokens)),
        )[: want - room]
        if not victims:
            return
        out = set(victims)
        for i in victims:
            seq = self._rows[i]
            seq.reset()
            self._wait([seq])
        self._select_rows([i for i in range(len(self._rows)) if i not in out])

    def _prefill_groups(self, seqs: list[_Seq], skip: int = 0) -> list[list[_Seq]]:
        """Cut length-sorted sequences into groups with little padding and bounded prefill tokens.

        ``skip`` leading tokens of every prompt are already in the cache (a shared prefix).
        """
        groups: list[list[_Seq]] = []
        current: list[_Seq] = []
        for s in seqs:
            n = len(s.req.input_ids) - skip
            if current:
                shortest = len(current[0].req.input_ids) - skip
                if (len(current) + 1) * n > self.max_batch_tokens or n > shortest * 1.25 + 4:
                    groups.append(current)
                    current = []
            current.append(s)
        if current:
            groups.append(current)
        return groups

    def _prefill_share(self, share: Share) -> list[_Part]:
        """Prefill rows that start with one prefix: the prefix once (unless held), then each row's suffix."""
        assert self.prefix is not None
        if share.kv is None:
            share.kv = self._build_prefix(share)
            if share.kv is None:
                return [p for group in self._prefill_groups(share.rows) for p in self._prefill(group)]
            self.prefix.cache.put(share.kv)
        rows = sorted(share.rows, key=lambda s: len(s.req.input_ids))
        return [p for group in self._prefill_groups(rows, skip=len(share.kv)) for p in self._prefill(group, share.kv)]

    def _build_prefix(self, share: Share) -> PrefixKV | None:
        """The prefix's keys and values: copied from a running row, or prefilled (on a shorter cached one)."""
        assert self.prefix is not None
        n = len(share.tokens)
        if share.source_row is not None and share.source_row < len(self._rows) and self._mask is not None:
            # the first n unmasked columns of a running row are its first n prompt tokens
            columns = self._mask[share.source_row].nonzero().squeeze(1)[:n]
            return PrefixKV.from_cache(share.tokens, self._cache, share.source_row, columns)
        base = self.prefix.cache.longest(share.tokens, n - 1)
        start = len(base) if base is not None else 0
        ids = torch.tensor([share.tokens[start:]], dtype=torch.long, device=self.device)
        mask = torch.ones((1, n), dtype=torch.long, device=self.device)
        pos = torch.arange(start, n, device=self.device)[None]
        cache = base.expand(1, n - start) if base is not None else SlabCache(self._layers)
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=pos,
                    **{self._cache_arg: cache},
                    use_cache=True,
                    logits_to_keep=1,
                )
        except Exception as exc:
            if not is_oom(exc):
                raise
            free_memory()
            return None  # the rows are prefilled whole, each on its own budget
        return PrefixKV.from_cache(share.tokens, returned_cache(out), 0, torch.arange(n, device=self.device))

    def _prefill_packed(self, seqs: list[_Seq]) -> list[_Part]:
        """Prefill prompts packed as one sequence per ``max_batch_tokens``: no padding, one forward each."""
        parts: list[_Part] = []
        pack: list[_Seq] = []
        tokens = 0
        for s in seqs:
            n = len(s.req.input_ids)
            if pack and tokens + n > self.max_batch_tokens:
                parts.extend(self._prefill_pack(pack))
                pack, tokens = [], 0
            pack.append(s)
            tokens += n
        if pack:
            parts.extend(self._prefill_pack(pack))
        return parts

    def _prefill_pack(self, pack: list[_Seq]) -> list[_Part]:
        """One packed prefill: the prompts end to end, positions restarting at each, attention per prompt.

        The bounds travel as transformers' varlen arguments to the engine's attention
        (``workers.engine.attention``); a model whose layers did not all honour them (attention code
        that bypasses the registered function) is prefilled in padded groups from then on.
        """
        lengths = [len(s.req.input_ids) for s in pack]
        cu = [0, *itertools.accumulate(lengths)]
        ids = torch.tensor([[t for s in pack for t in s.req.input_ids]], dtype=torch.long, device=self.device)
        pos = torch.cat([torch.arange(n, device=self.device) for n in lengths])[None]
        bounds = torch.tensor(cu, dtype=torch.int32, device=self.device)
        for s in pack:
            if s.decoding is not None:
                s.decoding.start()
        take_packed_calls()
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=ids,
                    position_ids=pos,
                    **{self._cache_arg: SlabCache(self._layers)},
                    use_cache=True,
                    logits_to_keep=bounds[1:].long() - 1,  # each prompt's last position
                    cu_seq_lens_q=bounds,
                    cu_seq_lens_k=bounds,
                    max_length_q=max(lengths),
                    max_length_k=max(lengths),
                )
        except Exception as exc:
            return self._halve_on_oom(exc, pack, self._prefill_pack)
        if take_packed_calls() != self._layers:
            log.warning("%s: attention did not honour packed prefill bounds; prefilling in padded groups", self.name)
            self._packs = False
            return [p for group in self._prefill_groups(pack) for p in self._prefill(group)]
        cache = returned_cache(out).unpacked(list(itertools.pairwise(cu)))
        width = max(lengths)
        n = torch.tensor(lengths, device=self.device)
        mask = (torch.arange(width, device=self.device)[None] >= (width - n)[:, None]).long()
        nxt = self._select(pack, out.logits[0].float())
        return [_Part(pack, cache, mask, torch.tensor(nxt, dtype=torch.long, device=self.device), n)]

    def _prefill(self, group: list[_Seq], prefix: PrefixKV | None = None) -> list[_Part]:
        """Prefill one group (splitting it on OOM) and pick each row's first token.

        With a ``prefix``, every row starts with it: the cache starts as copies of its keys and values
        and only the suffixes are prefilled (left-padded after the prefix, masked).
        """
        skip = len(prefix) if prefix is not None else 0
        ids, mask = pad_left([s.req.input_ids[skip:] for s in group], self.pad_id, self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0) + skip
        echo = any(s.req.prompt_logprobs for s in group)  # never with a prefix: the plan leaves such rows out
        for s in group:
            if s.decoding is not None:
                s.decoding.start()
        cache: Any = SlabCache(self._layers) if self._mergeable else None
        if prefix is not None:
            cache = prefix.expand(len(group), ids.shape[1])
            mask = torch.cat([mask.new_ones((len(group), skip)), mask], dim=1)
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=pos,
                    **{self._cache_arg: cache},
                    use_cache=True,
                    logits_to_keep=0 if echo else 1,  # 0: every position, to score the prompt
                )
        except Exception as exc:
            return self._halve_on_oom(exc, group, lambda rows: self._prefill(rows, prefix))
        for i, s in enumerate(group):
            if s.req.prompt_logprobs:
                n = len(s.req.input_ids)
                s.prompt_scored = prompt_scores(out.logits[i, -n:], s.req.input_ids, s.req.logprobs or 0)
        nxt = self._select(group, out.logits[:, -1, :].float())
        next_ids = torch.tensor(nxt, dtype=torch.long, device=self.device)
        return [_Part(group, returned_cache(out), mask, next_ids, mask.sum(-1).to(torch.long))]

    def _halve_on_oom(
        self, exc: Exception, rows: list[_Seq], again: Callable[[list[_Seq]], list[_Part]]
    ) -> list[_Part]:
        """A prefill that failed: out of memory, each half is tried again (a lone row fails); else re-raised."""
        if not is_oom(exc):
            raise exc
        free_memory()
        if len(rows) == 1:
            self._fail(rows[0], OutOfMemory(f"out of memory prefilling this prompt alone on {self.name}"))
            return []
        half = len(rows) // 2
        return again(rows[:half]) + again(rows[half:])

    def _join(self, parts: list[_Part]) -> None:
        """Add prefilled groups to the running batch with one copy of the cache, sized for the whole run.

        The copy orders rows by length: decode attention reads each run of rows from its own first
        used column (``engine_sdpa``), so neighbours of similar length read little padding. Rows that
        finished at their first token join too and leave at the next ``_retire``; unmergeable caches
        only ever join one part into an empty batch.
        """
        if self._rows:
            assert self._mask is not None and self._next is not None and self._pos is not None
            parts = [_Part(self._rows, self._cache, self._mask, self._next, self._pos), *parts]
        if len(parts) == 1:
            p = parts[0]
            self._rows, self._cache, self._mask, self._next, self._pos = list(p.rows), p.cache, p.mask, p.next, p.pos
            return
        assert self._mergeable
        flat = [s for p in parts for s in p.rows]
        order = sorted(range(len(flat)), key=lambda i: -flat[i].length)  # output row -> flat index
        place = [0] * len(flat)
        for out_row, i in enumerate(order):
            place[i] = out_row
        dest: list[torch.Tensor] = []
        at = 0
        for p in parts:
            dest.append(torch.tensor(place[at : at + len(p.rows)], device=self.device))
            at += len(p.rows)
        width = max(p.mask.shape[1] for p in parts)
        longest = max(s.final_length for s in flat)
        self._cache = SlabCache.merged([p.cache for p in parts], headroom=max(8, longest - width), dest=dest)
        perm = torch.tensor(order, device=self.device)

        def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(tensors, dim=0).index_select(0, perm)

        self._mask = cat([F.pad(p.mask, (width - p.mask.shape[1], 0)) for p in parts])
        self._next = cat([p.next for p in parts])
        self._pos = cat([p.pos for p in parts])
        self._rows = [flat[i] for i in order]

    # --- decoding ---------------------------------------------------------------------------------

    def _step(self) -> None:
        assert self._mask is not None and self._next is not None and self._pos is not None
        started = time.perf_counter()
        mask = F.pad(self._mask, (0, 1), value=1)
        try:
            with torch.inference_mode():
                last = self._forward(mask)
        except Exception as exc:
            if not is_oom(exc):
                raise
            self._on_step_oom()
            return
        self._mask = mask
        rows = len(self._rows)  # finished rows left the batch at the step they finished (_retire)
        nxt = self._select(self._rows, last.float())
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

    def _forward(self, mask: torch.Tensor) -> torch.Tensor:
        """One decode step's last-position logits ``[rows, vocab]``; the cache advances by one column."""
        assert self._mask is not None and self._next is not None and self._pos is not None
        if self._static is not None:
            logits = self._static(self._cache, self._mask, self._next, self._pos)
            if logits is not None:
                return logits
        out = self.model(
            input_ids=self._next[:, None],
            attention_mask=mask,
            position_ids=self._pos[:, None],
            **{self._cache_arg: self._cache},
            use_cache=True,
            logits_to_keep=1,
        )
        self._cache = returned_cache(out)
        return out.logits[:, -1, :]

    def _on_step_oom(self) -> None:
        """Evict the newest half back to the queue and lower the batch cap; alone, the sequence fails."""
        if self._static is not None:
            self._static.release()  # its arena and graphs are rebuilt, sized for the smaller batch
        free_memory()
        if len(self._rows) == 1:
            self._fail(self._rows[0], OutOfMemory(f"out of memory decoding this sequence alone on {self.name}"))
            self._rows[0].finish = "cancelled"
            self._retire()
            return
        keep = len(self._rows) // 2
        for s in reversed(self._rows[keep:]):
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
        if s.item.first_token_at is None:
            s.item.first_token_at = time.monotonic()
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
        """Answer finished rows now and take them out of the batch (see ``_fill_holes``)."""
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
        self._select_rows([i for i, s in enumerate(self._rows) if s.finish is None])

    def _select_rows(self, keep: list[int]) -> None:
        if not keep:
            self._rows, self._cache, self._mask, self._next, self._pos = [], None, None, None, None
            return
        assert self._mask is not None and self._next is not None and self._pos is not None
        if isinstance(self._cache, SlabCache) and len(keep) < len(self._rows):
            self._fill_holes(keep)
            return
        if len(keep) < len(self._rows):
            idx = torch.tensor(keep, device=self.device)
            self._cache.batch_select_indices(idx)
            self._mask = self._mask.index_select(0, idx)
            self._next = self._next.index_select(0, idx)
            self._pos = self._pos.index_select(0, idx)
            self._rows = [self._rows[i] for i in keep]
        self._trim()

    def _fill_holes(self, keep: list[int]) -> None:
        """Keep rows ``keep`` (ascending): the kept rows past ``len(keep)`` move into the places of the rows
        that leave before it; the others stay where they are.

        Only the moved rows' keys and values are copied. Copying every kept row into a new slab cost
        as much as a decode step, so finished rows used to wait in the batch (decoding padding) until
        an eighth of it had finished; now they leave at the step they finish. Rows that joined
        together are ordered longest first; a moved row breaks that order until the next join.
        """
        assert self._mask is not None and self._next is not None and self._pos is not None
        n = len(keep)
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        order = list(range(n))
        for h, m in zip(holes, movers, strict=True):
            order[h] = m
        self._cache.fill_holes(
            torch.tensor(holes, dtype=torch.long, device=self.device),
            torch.tensor(movers, dtype=torch.long, device=self.device),
            n,
        )
        idx = torch.tensor(order, device=self.device)
        self._mask = self._mask.index_select(0, idx)
        self._next = self._next.index_select(0, idx)
        self._pos = self._pos.index_select(0, idx)
        self._rows = [self._rows[i] for i in order]
        self._trim()

    def _trim(self) -> None:
        """Drop leading columns that are padding in every remaining row."""
        assert self._mask is not None
        lead = int((self._mask.sum(0) == 0).long().cumprod(0).sum().item())
        if lead and self._mergeable:
            self._mask = self._mask[:, lead:]
            self._cache.trim_left(lead)

    def _fail(self, seq: _Seq, exc: BaseException) -> None:
        seq.item.reject(exc)
        self._groups.pop(id(seq.item), None)


__all__ = ["DecodeEngine", "GenOutput", "GenRequest"]
