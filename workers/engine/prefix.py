"""Shared-prefix reuse for the decode engine: a prompt prefix common to many rows is prefilled once.

Bulk files repeat one system turn or few-shot block across thousands of lines. Before a group of
waiting rows is prefilled, :class:`PrefixReuse` plans which token prefix each row can start from:

* a prefix common to several rows admitted together (found by sorting their prompts and taking
  longest common prefixes of neighbours);
* one still held in a small LRU cache of recent prefixes (rows admitted in later rounds);
* one read back from a running row that starts with the same tokens.

A prefix's keys and values are computed once (or copied out of the cache or a running row) and copied
into every row that starts with it; each row then prefills only its own suffix, attending to the
prefix through the cache. Positions and the attention mask are the ones the whole prompt would have had,
so a row's tokens are those of a plain prefill (greedy, token for token; sampled, the same distribution).

The cache is bounded in tokens (``capacity``); those tokens count against the engine's
``kv_cache_tokens`` when it admits rows.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workers.engine.kvcache import SlabCache, SlabLayer

# Shorter common prefixes are not worth an extra forward call and a copy per row.
MIN_SHARED = 16
# A neighbour that shares less than this fraction of a group's prefix starts a new group: one short
# overlap must not cut a 512-token shared prefix down to 20 tokens for everyone.
KEEP_FRACTION = 0.75

PrefixObserver = Callable[[str, int, int, int], None]  # (model, rows admitted, rows reusing, tokens saved)


@dataclass(eq=False)
class PrefixKV:
    """The keys and values of one token prefix, per layer ``[1, kv heads, length, head dim]``."""

    tokens: tuple[int, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_cache(cls, tokens: Sequence[int], cache: SlabCache, row: int, columns: torch.Tensor) -> PrefixKV:
        """Copy ``columns`` of ``row`` out of a cache (columns index the filled span of each layer)."""
        keys, values = [], []
        for layer in cache.slabs:
            k, v = layer.keys, layer.values
            assert k is not None and v is not None
            keys.append(k[row : row + 1].index_select(2, columns).clone())
            values.append(v[row : row + 1].index_select(2, columns).clone())
        return cls(tuple(tokens), keys, values)

    def expand(self, rows: int, headroom: int) -> SlabCache:
        """A cache of ``rows`` rows that each start with this prefix, with room for ``headroom`` more columns."""
        cache = SlabCache(0)
        n = len(self.tokens)
        for k, v in zip(self.keys, self.values, strict=True):
            layer = SlabLayer()
            layer.lazy_initialization(k, v)
            layer._k = k.new_empty((rows, k.shape[1], n + headroom, k.shape[3]))
            layer._v = v.new_empty((rows, v.shape[1], n + headroom, v.shape[3]))
            layer._k[:, :, :n] = k
            layer._v[:, :, :n] = v
            layer.start, layer.end = 0, n
            cache.layers.append(layer)
        return cache


class PrefixCache:
    """Recent prefixes, least recently used first out, bounded by their total length in tokens."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.tokens = 0
        self._entries: collections.OrderedDict[tuple[int, ...], PrefixKV] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, ids: Sequence[int], limit: int) -> PrefixKV | None:
        """The longest cached prefix of ``ids`` no longer than ``limit`` tokens (marked as just used)."""
        best: PrefixKV | None = None
        for key, entry in self._entries.items():
            n = len(key)
            if n <= limit and (best is None or n > len(best)) and tuple(ids[:n]) == key:
                best = entry
        if best is not None:
            self._entries.move_to_end(best.tokens)
        return best

    def put(self, entry: PrefixKV) -> None:
        if len(entry) > self.capacity or entry.tokens in self._entries:
            return
        self._entries[entry.tokens] = entry
        self.tokens += len(entry)
        while self.tokens > self.capacity:
            _, old = self._entries.popitem(last=False)
            self.tokens -= len(old)

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0


def common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    # compare in blocks first: prompts sharing hundreds of tokens are the case this is for
    step = 64
    while i + step <= n and tuple(a[i : i + step]) == tuple(b[i : i + step]):
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Share:
    """Rows that start from one prefix; ``kv`` is None until the prefix is built."""

    tokens: tuple[int, ...]
    rows: list[Any]
    kv: PrefixKV | None = None
    source_row: int | None = None  # a running row holding this prefix, to copy it from


def groups(prompts: list[tuple[int, ...]], min_shared: int = MIN_SHARED) -> list[tuple[int, list[int]]]:
    """``(shared length, member indices)`` for runs of prompts with a long common prefix.

    Sorted prompts put every row sharing a prefix next to each other; neighbours' common prefixes
    then decide the runs. A run whose members share much less than its best pair is cut where they
    part, so a row overlapping briefly does not shorten everyone's prefix.
    """
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    lcp = [common(prompts[a], prompts[b]) for a, b in itertools.pairwise(order)]
    out: list[tuple[int, list[int]]] = []

    def split(lo: int, hi: int, floor: float) -> None:  # rows order[lo..hi], pairs lcp[lo..hi-1]
        cuts = [i for i in range(lo, hi) if lcp[i] < floor]
        if cuts:
            for a, b in zip([lo, *(c + 1 for c in cuts)], [*cuts, hi], strict=True):
                if b > a:
                    split(a, b, floor)
            return
        low, top = min(lcp[lo:hi]), max(lcp[lo:hi])
        if low >= KEEP_FRACTION * top:
            out.append((low, [order[i] for i in range(lo, hi + 1)]))
        else:
            split(lo, hi, KEEP_FRACTION * top)

    if lcp:
        split(0, len(lcp), min_shared)
    return out


class PrefixReuse:
    """Plans and counts prefix reuse for one engine; the engine runs the forwards."""

    def __init__(self, name: str, capacity: int, observer: PrefixObserver | None = None) -> None:
        self.name = name
        self.cache = PrefixCache(capacity)
        self.observer = observer
        self.rows = 0  # rows admitted
        self.hits = 0  # rows that started from a shared prefix
        self.saved = 0  # prompt tokens not prefilled

    @property
    def tokens(self) -> int:
        """KV positions the cache holds (counted against the engine's ``kv_cache_tokens``)."""
        return self.cache.tokens

    def plan(self, waiting: list[Any], running: list[Any]) -> tuple[list[Share], list[Any]]:
        """Split admitted rows into shares (rows starting from one prefix) and rows prefilled whole.

        Rows are anything with ``req.input_ids``; ``running`` rows only lend their prompts.
        """
        prompts = [tuple(s.req.input_ids) for s in waiting] + [tuple(s.req.input_ids) for s in running]
        n_wait = len(waiting)
        by_prefix: dict[tuple[int, ...], Share] = {}
        placed: set[int] = set()
        for shared, members in groups(prompts):
            own = [i for i in members if i < n_wait]
            if not own:
                continue
            # each waiting row keeps at least its last token to prefill: it gives the first new token
            length = min(shared, *(len(prompts[i]) - 1 for i in own))
            lenders = [i - n_wait for i in members if i >= n_wait]
            if length < MIN_SHARED or (len(own) < 2 and not lenders):
                continue
            tokens = prompts[own[0]][:length]
            share = by_prefix.setdefault(tokens, Share(tokens, []))
            share.rows.extend(waiting[i] for i in own)
            if lenders and share.source_row is None:
                share.source_row = lenders[0]
            placed.update(own)
        for i, s in enumerate(waiting):
            if i in placed:
                continue
            hit = self.cache.longest(prompts[i], len(prompts[i]) - 1)
            if hit is not None and len(hit) >= MIN_SHARED:
                share = by_prefix.setdefault(hit.tokens, Share(hit.tokens, [], hit))
                share.rows.append(s)
                placed.add(i)
        shares = list(by_prefix.values())
        for share in shares:
            if share.kv is None:
                exact = self.cache.longest(share.tokens, len(share.tokens))
                if exact is not None and len(exact) == len(share.tokens):
                    share.kv = exact
        rest = [s for i, s in enumerate(waiting) if i not in placed]
        self.count(len(waiting), shares)
        return shares, rest

    def count(self, admitted: int, shares: list[Share]) -> None:
        hits = sum(len(s.rows) for s in shares)
        # a prefix built here is prefilled once: every row but one skips it; a cached or lent one, every row
        saved = sum(len(s.tokens) * (len(s.rows) - (1 if s.kv is None and s.source_row is None else 0)) for s in shares)
        self.rows += admitted
        self.hits += hits
        self.saved += saved
        if self.observer is not None and admitted:
            self.observer(self.name, admitted, hits, saved)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.rows if self.rows else 0.0

    def stats(self) -> dict[str, float]:
        return {
            "rows": self.rows,
            "hits": self.hits,
            "hit_rate": self.hit_rate,
            "tokens_saved": self.saved,
            "cached_prefixes": len(self.cache),
            "cached_tokens": self.cache.tokens,
        }


__all__ = ["MIN_SHARED", "PrefixCache", "PrefixKV", "PrefixReuse", "Share", "common", "groups"]
