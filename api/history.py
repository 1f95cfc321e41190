"""The last hour of queue depths and generated tokens, sampled into Redis for the dashboard's plots.

Each series is a sorted set of samples scored by Redis time and trimmed to an hour, so every API
replica reads the same history and a restarted API keeps it. The API's upkeep samples every
``history_interval_s``; a short lock lets one replica sample per interval. Tokens are stored as the
cumulative count the workers keep (``generated_tokens``) and turned into rates when read, so a late or
missed sample lowers the resolution but never loses or doubles tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import cast

import redis

from queueformer.server import keys

WINDOW_S = 3600

Point = tuple[float, float]  # (unix seconds, value)


class History:
    """Write and read the last-hour series."""

    def __init__(self, client: redis.Redis, interval_s: float) -> None:
        self.r = client
        self.interval_s = interval_s

    def sample(self, queues: Sequence[str]) -> bool:
        """Record one sample of every queue's depth and every model's token count; False if another replica did."""
        # Held a little less than one interval: the replica that sampled last can sample again on time.
        hold_ms = max(1, int(self.interval_s * 900))
        if not self.r.set(keys.SERIES_SAMPLER, "1", nx=True, px=hold_ms):
            return False
        secs, micros = self.r.time()
        now = secs + micros / 1e6
        depths = queue_depths(self.r, queues)
        tokens = cast(dict[str, str], self.r.hgetall(keys.GENERATED_TOKENS))
        p = self.r.pipeline(transaction=False)
        for queue, depth in depths.items():
            self._add(p, keys.queue_depth_series(queue), now, depth)
        for model, count in tokens.items():
            self._add(p, keys.tokens_series(model), now, int(count))
        p.execute()
        return True

    @staticmethod
    def _add(p: redis.client.Pipeline, key: str, now: float, value: int) -> None:
        p.zadd(key, {f"{int(now * 1000)}:{value}": now})
        p.zremrangebyscore(key, "-inf", now - WINDOW_S)
        p.expire(key, WINDOW_S + 60)  # a series nobody samples any more (queue or model gone) goes away

    def _read(self, keys: Sequence[str], since: float) -> list[list[Point]]:
        p = self.r.pipeline(transaction=False)
        for key in keys:
            p.zrangebyscore(key, since, "+inf", withscores=True)
        out = []
        for rows in p.execute():
            out.append([(float(score), float(member.rsplit(":", 1)[1])) for member, score in rows])
        return out

    def queue_depths(self, queues: Iterable[str], since: float) -> dict[str, list[Point]]:
        names = sorted(queues)
        return dict(zip(names, self._read([keys.queue_depth_series(q) for q in names], since), strict=True))

    def token_rates(self, models: Iterable[str], since: float) -> dict[str, list[Point]]:
        """Tokens/s per model between consecutive samples, stamped at the later one."""
        names = sorted(models)
        # One sample before ``since`` is needed for the first rate: read one interval further back.
        back = since - max(self.interval_s, 1.0) * 1.5
        series = self._read([keys.tokens_series(m) for m in names], back)
        return {name: rates(points, since) for name, points in zip(names, series, strict=True)}


def queue_depths(client: redis.Redis, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each queue (kombu keeps a Redis list per queue and priority), in one round trip."""
    names = sorted(queues)
    p = client.pipeline(transaction=False)
    for q in names:
        for name in keys.queue_lists(q):
            p.llen(name)
    lengths = iter(p.execute())
    return {q: sum(int(next(lengths)) for _ in keys.PRIORITY_STEPS) for q in names}


def rates(counts: Sequence[Point], since: float = 0.0) -> list[Point]:
    """Per-second rates of a cumulative count; a count that went down (counter reset) restarts from zero."""
    out = []
    for (t0, c0), (t1, c1) in pairwise(counts):
        if t1 <= t0 or t1 < since:
            continue
        added = c1 - c0 if c1 >= c0 else c1
        out.append((t1, added / (t1 - t0)))
    return out
