"""Planning prefix reuse: which rows share which prefix, and the LRU bound of the prefix cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.engine.prefix import MIN_SHARED, PrefixCache, PrefixKV, PrefixReuse, common, groups


@dataclass
class Req:
    input_ids: tuple[int, ...]


@dataclass
class Row:
    req: Req


def row(*parts: list[int]) -> Row:
    return Row(Req(tuple(x for p in parts for x in p)))


def kv(tokens: list[int]) -> PrefixKV:
    t = torch.zeros((1, 1, len(tokens), 2))
    return PrefixKV(tuple(tokens), [t], [t])


SHARED = list(range(100, 164))  # 64 tokens


def test_common_prefix_length() -> None:
    assert common([1, 2, 3], [1, 2, 4]) == 2
    assert common(list(range(200)), list(range(200))) == 200
    assert common([*list(range(130)), 7], [*list(range(130)), 8]) == 130
    assert common([], [1]) == 0


def test_groups_keep_a_long_prefix_when_one_row_overlaps_briefly() -> None:
    prompts = [(*SHARED, i, i) for i in range(5)] + [(*SHARED[:20], 9, 9)]
    found = groups(prompts)
    assert found == [(64, [0, 1, 2, 3, 4])]


def test_plan_shares_rows_with_a_common_prefix_and_keeps_the_last_token_to_prefill() -> None:
    reuse = PrefixReuse("m", capacity=1000)
    rows = [row(SHARED, [1]), row(SHARED, [2, 3]), row([5] * 40), row(SHARED)]
    shares, rest = reuse.plan(rows, [])
    assert len(shares) == 1
    # the row that is exactly the prefix must still prefill one token of its own
    assert shares[0].tokens == tuple(SHARED[:-1])
    assert rest == [rows[2]]
    assert reuse.hits == 3 and reuse.rows == 4


def test_plan_takes_a_cached_prefix_for_a_row_alone_and_a_running_row_for_another() -> None:
    reuse = PrefixReuse("m", capacity=1000)
    reuse.cache.put(kv(SHARED))
    alone = row(SHARED, [1, 2])
    shares, rest = reuse.plan([alone], [])
    assert rest == [] and shares[0].kv is not None and shares[0].tokens == tuple(SHARED)
    other = [7] * 30
    running = row(other, [1])
    shares, rest = reuse.plan([row(other, [2])], [running])
    assert rest == [] and shares[0].source_row == 0 and len(shares[0].tokens) == 30
    short = row([1] * (MIN_SHARED - 1), [3])
    shares, rest = reuse.plan([short, row([1] * (MIN_SHARED - 1), [4])], [])
    assert shares == [] and len(rest) == 2


def test_prefix_cache_evicts_least_recently_used_by_tokens() -> None:
    cache = PrefixCache(capacity=100)
    a, b, c = kv([1] * 40), kv([2] * 40), kv([3] * 40)
    cache.put(a)
    cache.put(b)
    assert cache.longest([1] * 50, 49) is a  # a is now the most recently used
    cache.put(c)
    assert cache.tokens == 80 and len(cache) == 2
    assert cache.longest([2] * 50, 49) is None
    assert cache.longest([1] * 50, 39) is None  # longer than the limit
    cache.put(kv([4] * 101))  # larger than the whole cache: not kept
    assert cache.tokens == 80
