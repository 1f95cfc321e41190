"""The per-line ledger of a batch: which lines are committed, their output or error lines, and the plan.

Each batch line is committed exactly once: a Lua script checks and sets the line's bit in a ``done``
bitmap, stores the output (or error) line and bumps the batch's counters in one step, so a redelivered
chunk, a retried unit or a cancel racing a worker can never count a line twice. The ledger also keeps
the batch's chunk plan (what was enqueued), delivery counts per line, and turns uncommitted lines into
work units or into error lines. Status moves are :mod:`queueformer.server.batches`'s business.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, cast

import redis
from redis.client import NEVER_DECODE

from queueformer.contract.errors import ErrorInfo
from queueformer.contract.openai_batch import error_line
from queueformer.contract.priority import DEFAULT_BATCH_PRIORITY
from queueformer.contract.units import LinesUnit
from queueformer.server import keys
from queueformer.server.batch_input import Chunk, custom_id_of, iter_range
from queueformer.server.files import FileStore
from queueformer.server.storage import Storage

_RAW = {NEVER_DECODE: True}

Entry = tuple[int, str, dict[str, Any], int, int]  # (line, "out" | "err", line object, input tokens, output tokens)

# KEYS: batch, out, err, done, the generated-tokens counter. ARGV: line, 'out'|'err', line JSON, input
# tokens, output tokens, now, model ('' counts nothing). Returns the lines still remaining, -1 for a line
# already committed, -2 for a batch that is gone; only a first commit counts its tokens.
_COMMIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
if redis.call('GETBIT', KEYS[4], ARGV[1]) == 1 then return -1 end
redis.call('SETBIT', KEYS[4], ARGV[1], 1)
if ARGV[2] == 'out' then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'completed', 1)
else
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'failed', 1)
end
if tonumber(ARGV[4]) > 0 then redis.call('HINCRBY', KEYS[1], 'input_tokens', ARGV[4]) end
if tonumber(ARGV[5]) > 0 then
  redis.call('HINCRBY', KEYS[1], 'output_tokens', ARGV[5])
  if ARGV[7] ~= '' then redis.call('HINCRBY', KEYS[5], ARGV[7], ARGV[5]) end
end
redis.call('HSET', KEYS[1], 'progress_at', ARGV[6])
local b = redis.call('HMGET', KEYS[1], 'total', 'completed', 'failed')
return tonumber(b[1]) - tonumber(b[2]) - tonumber(b[3])
"""


class Bitmap:
    """A Redis bitmap read in one piece: bit ``n`` is the high bit of byte ``n // 8`` first."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def has(self, pos: int) -> bool:
        at = pos // 8
        return at < len(self.data) and bool(self.data[at] & (0x80 >> (pos % 8)))

    def count(self, first: int, last: int) -> int:
        """Set bits at positions ``first..last``."""
        lo, hi = first // 8, last // 8
        span = self.data[lo : hi + 1].ljust(hi - lo + 1, b"\0")
        width = len(span) * 8
        # In the big-endian integer, position p sits at bit (width - 1 - (p - lo * 8)).
        low_bit = width - 1 - (last - lo * 8)
        mask = ((1 << (last - first + 1)) - 1) << low_bit
        return (int.from_bytes(span, "big") & mask).bit_count()


class Ledger:
    """Line commits, the chunk plan and delivery counts of every batch."""

    def __init__(self, client: redis.Redis, storage: Storage, files: FileStore) -> None:
        self.r = client
        self.storage = storage
        self.files = files
        self._commit = client.register_script(_COMMIT)

    # --- commits ----------------------------------------------------------------------------------

    def commit_many(self, batch_id: str, entries: Sequence[Entry], model: str = "") -> int | None:
        """Commit (line, 'out'|'err', line object, input tokens, output tokens) entries; returns what remains.

        With ``model``, the output tokens of lines committed here for the first time are added to its
        count of generated tokens.
        """
        if not entries:
            return None
        parts = (keys.batch_part(batch_id, part) for part in ("out", "err", "done"))
        names = [keys.batch(batch_id), *parts, keys.GENERATED_TOKENS]
        now = str(int(time.time()))
        p = self.r.pipeline(transaction=False)
        for line, kind, obj, tin, tout in entries:
            self._commit(
                keys=names,
                args=[line, kind, json.dumps(obj, ensure_ascii=False, separators=(",", ":")), tin, tout, now, model],
                client=p,
            )
        results = [int(x) for x in p.execute()]
        remaining = [x for x in results if x >= 0]
        return min(remaining) if remaining else None

    def committed(self, batch_id: str, lines: Sequence[int]) -> set[int]:
        if not lines:
            return set()
        p = self.r.pipeline(transaction=False)
        for line in lines:
            p.getbit(keys.batch_part(batch_id, "done"), line)
        return {line for line, bit in zip(lines, p.execute(), strict=True) if bit}

    def done(self, batch_id: str) -> Bitmap:
        return Bitmap(cast(bytes, self.r.execute_command("GET", keys.batch_part(batch_id, "done"), **_RAW) or b""))

    def bump_deliveries(self, batch_id: str, lines: Sequence[int]) -> list[int]:
        p = self.r.pipeline(transaction=False)
        for line in lines:
            p.hincrby(keys.batch_part(batch_id, "tries"), str(line), 1)
        return [int(x) for x in p.execute()]

    def error_lines(self, batch_id: str) -> dict[int, dict[str, Any]]:
        raw = cast(dict[str, str], self.r.hgetall(keys.batch_part(batch_id, "err")))
        return {int(k): json.loads(v) for k, v in raw.items()}

    def reopen(self, p: redis.client.Pipeline, batch_id: str, lines: Sequence[int]) -> None:
        """Queue, on ``p``, the undoing of these lines' error commits: they will run and commit again."""
        for line in lines:
            p.hdel(keys.batch_part(batch_id, "err"), str(line))
            p.setbit(keys.batch_part(batch_id, "done"), line, 0)
            p.hdel(keys.batch_part(batch_id, "tries"), str(line))

    def lines_so_far(self, batch_id: str, errors: bool = False) -> list[bytes]:
        """Committed output (or error) lines still held in Redis, in line order."""
        values = cast(dict[str, str], self.r.hgetall(keys.batch_part(batch_id, "err" if errors else "out")))
        return [(v + "\n").encode() for _, v in sorted(values.items(), key=lambda kv: int(kv[0]))]

    # --- the plan -----------------------------------------------------------------------------------

    def plan(self, p: redis.client.Pipeline, batch_id: str, chunks: list[Chunk]) -> None:
        if chunks:
            p.rpush(
                keys.batch_part(batch_id, "chunks"),
                *[json.dumps([c.index, c.first, c.start, c.end, c.models, c.last, c.count]) for c in chunks],
            )

    def chunks(self, batch_id: str) -> list[Chunk]:
        raw = cast(list[str], self.r.lrange(keys.batch_part(batch_id, "chunks"), 0, -1))
        return [Chunk(*json.loads(c)) for c in raw]

    def _input_key(self, batch_id: str) -> str:
        return self.files.key(cast(str, self.r.hget(keys.batch(batch_id), "input_file_id")))

    def _priority(self, batch_id: str) -> int:
        raw = cast(str | None, self.r.hget(keys.batch(batch_id), "priority"))
        return int(raw) if raw else DEFAULT_BATCH_PRIORITY

    def _chunk_units(self, batch_id: str, c: Chunk, priority: int = DEFAULT_BATCH_PRIORITY) -> list[LinesUnit]:
        return [
            LinesUnit(
                model=model,
                batch=batch_id,
                chunk=c.index,
                first=c.first,
                start=c.start,
                end=c.end,
                only=lines,
                priority=priority,
            )
            for model, lines in c.models.items()
        ]

    def _chunk_lines(self, batch_id: str, c: Chunk) -> list[int]:
        data = self.storage.read_range(self._input_key(batch_id), c.start, c.end)
        return [idx for idx, _ in iter_range(data, c.first)]

    def units(self, batch_id: str, only: set[int] | None = None) -> list[LinesUnit]:
        """Work units, one per (chunk, model); with ``only``, just the units holding those lines."""
        units = []
        priority = self._priority(batch_id)
        for c in self.chunks(batch_id):
            for unit in self._chunk_units(batch_id, c, priority):
                if only is not None:
                    lines = unit.only if unit.only is not None else self._chunk_lines(batch_id, c)
                    picked = [x for x in lines if x in only]
                    if not picked:
                        continue
                    unit.only = picked
                units.append(unit)
        return units

    def open_units(self, batch_id: str) -> list[LinesUnit]:
        """The batch's work units that still have uncommitted lines: one read of its chunks and bitmap."""
        done = self.done(batch_id)
        out = []
        priority = self._priority(batch_id)
        for c in self.chunks(batch_id):
            for unit in self._chunk_units(batch_id, c, priority):
                if unit.only is not None:
                    left = any(not done.has(i) for i in unit.only)
                elif c.last is None or c.count is None:  # recorded before chunks kept their line count
                    left = any(not done.has(i) for i in self._chunk_lines(batch_id, c))
                else:
                    left = done.count(c.first, c.last) < c.count
                if left:
                    out.append(unit)
        return out

    # --- lines that can never run -------------------------------------------------------------------

    def error_entries(
        self, batch_id: str, first: int, start: int, end: int, only: list[int] | None, code: str, message: str
    ) -> list[Entry]:
        """Error lines for the uncommitted lines of bytes ``[start, end)`` (just ``only``, when given)."""
        wanted = set(only) if only is not None else None
        data = self.storage.read_range(self._input_key(batch_id), start, end)
        rows = [(i, line) for i, line in iter_range(data, first) if wanted is None or i in wanted]
        done = self.committed(batch_id, [i for i, _ in rows])
        info = ErrorInfo(code=code, message=message)
        return [
            (i, "err", error_line(custom_id_of(line) or f"line-{i + 1}", info), 0, 0)
            for i, line in rows
            if i not in done
        ]

    def close_unit(self, unit: LinesUnit, code: str, message: str) -> int:
        """Commit the unit's uncommitted lines as errors; returns how many."""
        entries = self.error_entries(unit.batch, unit.first, unit.start, unit.end, unit.only, code, message)
        self.commit_many(unit.batch, entries)
        return len(entries)

    def close_all(self, batch_id: str, code: str, message: str) -> None:
        """Commit every remaining line of the batch as an error."""
        entries: list[Entry] = []
        for c in self.chunks(batch_id):
            entries += self.error_entries(batch_id, c.first, c.start, c.end, None, code, message)
        for at in range(0, len(entries), 1000):
            self.commit_many(batch_id, entries[at : at + 1000])
