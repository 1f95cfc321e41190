"""Batches and their per-line ledger, in Redis; outputs and error files, in storage.

Each batch line is committed exactly once: a Lua script checks and sets the line's bit in a ``done``
bitmap, stores the output (or error) line and bumps the counters in one step, so a redelivered chunk,
a retried unit or a cancel racing a worker can never count a line twice. The worker (or API call)
whose commit leaves nothing remaining finalizes: output and error files are written, the status moves
on, the tenant's enqueued-token quota is released and the webhook is called. A finalizer that dies is
replaced once its claim is stale, so no batch stays in ``finalizing``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.client import NEVER_DECODE

from queueformer.contract.errors import Conflict, ErrorInfo, NotFound, QueueformerError
from queueformer.contract.ids import valid_object_id
from queueformer.contract.openai_batch import LineError, error_line, parse_line
from queueformer.contract.tasks import AnyJob, estimate_tokens
from queueformer.contract.units import LinesUnit
from queueformer.server import keys, webhooks
from queueformer.server.files import FileStore
from queueformer.server.storage import Storage

log = logging.getLogger(__name__)

_RAW = {NEVER_DECODE: True}
WINDOW_S = 24 * 3600
FINALIZE_STALE_S = 300
OPEN = ("validating", "in_progress", "finalizing", "cancelling")
DONE = ("failed", "completed", "expired", "cancelled")

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
if tonumber(ARGV[5]) > 0 then redis.call('HINCRBY', KEYS[1], 'output_tokens', ARGV[5]) end
redis.call('HSET', KEYS[1], 'progress_at', ARGV[6])
local b = redis.call('HMGET', KEYS[1], 'total', 'completed', 'failed')
return tonumber(b[1]) - tonumber(b[2]) - tonumber(b[3])
"""

# Move status from one of ARGV[1] (comma list) to ARGV[2], stamping ARGV[3] = now into ARGV[4..].
_STATUS = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, ''} end
if string.find(',' .. ARGV[1] .. ',', ',' .. cur .. ',', 1, true) == nil then return {0, cur} end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for i = 4, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], ARGV[3]) end
return {1, cur}
"""


@dataclass
class Chunk:
    """A run of consecutive lines: bytes ``[start, end)`` of the input file, and which model runs which line.

    ``models`` maps each model in the chunk to its line indices, or to ``None`` when the whole chunk is
    one model's (the usual case, which keeps messages small). ``last`` and ``count`` let the ledger tell
    whether a chunk is finished from the done bitmap alone, without reading the input file again
    (chunks recorded before they existed have ``None``).
    """

    index: int
    first: int  # physical line index of the first line in the byte range
    start: int
    end: int
    models: dict[str, list[int] | None]
    last: int | None = None  # physical line index of the last non-blank line
    count: int | None = None  # non-blank lines in the range


@dataclass
class Scan:
    """What validating an input file found."""

    lines: list[tuple[int, int, int]]  # (physical index, start byte, end byte) of non-blank lines
    errors: list[tuple[int, str | None, LineError]]
    line_models: dict[int, str]  # valid line -> its model
    tokens: int

    @property
    def models(self) -> list[str]:
        return sorted(set(self.line_models.values()))

    def chunks(self, size: int) -> list[Chunk]:
        """Consecutive runs of ``size`` lines as byte ranges of the input file."""
        out = []
        for n, at in enumerate(range(0, len(self.lines), size)):
            part = self.lines[at : at + size]
            per_model: dict[str, list[int]] = {}
            for idx, _, _ in part:
                if idx in self.line_models:
                    per_model.setdefault(self.line_models[idx], []).append(idx)
            if not per_model:
                continue  # nothing valid to run here: every line is already in the error file
            models: dict[str, list[int] | None] = dict.fromkeys(per_model) if len(per_model) == 1 else dict(per_model)
            out.append(Chunk(n, part[0][0], part[0][1], part[-1][2], models, part[-1][0], len(part)))
        return out


LineCheck = Callable[[AnyJob], None]


def scan_file(storage: Storage, key: str, endpoint: str, max_lines: int, check: LineCheck | None = None) -> Scan:
    """Validate every line of an input file in one streaming pass; ``check`` adds caller rules (registry)."""
    lines: list[tuple[int, int, int]] = []
    errors: list[tuple[int, str | None, LineError]] = []
    line_models: dict[int, str] = {}
    seen: set[str] = set()
    tokens = 0
    offset = 0
    with storage.open_read(key) as fh:
        for index, raw in enumerate(fh):
            start = offset
            offset += len(raw)
            if not raw.strip():
                continue
            if len(lines) >= max_lines:
                raise TooManyLines(max_lines)
            lines.append((index, start, offset))
            try:
                line, job = parse_line(raw, endpoint)
                if line.custom_id in seen:
                    raise LineError(
                        "duplicate_custom_id",
                        f"custom_id {line.custom_id!r} appears more than once",
                        line.custom_id,
                        "custom_id",
                    )
                seen.add(line.custom_id)
                if check is not None:
                    check(job)
                line_models[index] = job.model
                tokens += estimate_tokens(job)
            except LineError as err:
                errors.append((index, err.custom_id, err))
            except QueueformerError as err:
                errors.append(
                    (index, custom_id_of(raw), LineError(err.code, err.message, custom_id_of(raw), err.param))
                )
    return Scan(lines=lines, errors=errors, line_models=line_models, tokens=tokens)


def custom_id_of(raw: bytes) -> str | None:
    try:
        value = json.loads(raw).get("custom_id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


class TooManyLines(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the input file has more than {limit} requests")
        self.limit = limit


def iter_range(data: bytes, first: int) -> Iterator[tuple[int, bytes]]:
    """(physical line index, line) for the non-blank lines of a chunk's bytes."""
    for offset, raw in enumerate(data.splitlines()):
        if raw.strip():
            yield first + offset, raw


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


class BatchStore:
    """Batch records, the line ledger, finalization, cancel, expiry and retry."""

    def __init__(
        self,
        client: redis.Redis,
        storage: Storage,
        files: FileStore,
        ttl_s: int = 30 * 24 * 3600,
        webhook_secret: str | None = None,
    ) -> None:
        self.r = client
        self.storage = storage
        self.files = files
        self.ttl = ttl_s
        self.webhook_secret = webhook_secret
        self._commit = client.register_script(_COMMIT)
        self._status = client.register_script(_STATUS)

    # --- records ----------------------------------------------------------------------------------

    def create(self, batch_id: str, tenant: str, body: dict[str, Any]) -> None:
        now = int(time.time())
        fields: dict[Any, Any] = {
            "id": batch_id,
            "tenant": tenant,
            "endpoint": body["endpoint"],
            "input_file_id": body["input_file_id"],
            "completion_window": body.get("completion_window", "24h"),
            "status": "validating",
            "created_at": str(now),
            "expires_at": str(now + WINDOW_S),
            "total": "0",
            "completed": "0",
            "failed": "0",
            "input_tokens": "0",
            "output_tokens": "0",
            "metadata": json.dumps(body.get("metadata")),
            "webhook_url": body.get("webhook_url") or "",
        }
        p = self.r.pipeline()
        p.hset(keys.batch(batch_id), mapping=fields)
        p.zadd(keys.tenant_batches(tenant), {batch_id: now})
        p.sadd(keys.tenant_open_batches(tenant), batch_id)
        p.sadd(keys.OPEN_BATCHES, batch_id)
        p.execute()

    def open_batches(self, tenant: str) -> int:
        return int(self.r.scard(keys.tenant_open_batches(tenant)))

    def start(self, batch_id: str, scan: Scan, chunks: list[Chunk], tenant: str) -> None:
        """Record what validation found and move to ``in_progress`` (or ``failed`` if nothing can run)."""
        p = self.r.pipeline()
        p.hset(
            keys.batch(batch_id),
            mapping={
                "total": str(len(scan.lines)),
                "model": scan.models[0] if len(scan.models) == 1 else "",
                "models": json.dumps(scan.models),
                "tokens": str(scan.tokens),
                "chunks": str(len(chunks)),
                "errors": json.dumps(
                    [
                        {"code": e.code, "message": e.message, "param": e.param, "line": idx + 1}
                        for idx, _cid, e in scan.errors[:1000]
                    ]
                ),
            },
        )
        if chunks:
            p.rpush(
                keys.batch_part(batch_id, "chunks"),
                *[json.dumps([c.index, c.first, c.start, c.end, c.models, c.last, c.count]) for c in chunks],
            )
        if scan.tokens:
            p.incrby(keys.tenant_tokens(tenant), scan.tokens)
        p.execute()
        self.commit_many(
            batch_id,
            [
                (
                    idx,
                    "err",
                    error_line(cid or f"line-{idx + 1}", ErrorInfo(code=e.code, message=e.message, param=e.param), 400),
                    0,
                    0,
                )
                for idx, cid, e in scan.errors
            ],
        )
        if len(scan.errors) == len(scan.lines):
            reason = (
                "the input file has no requests" if not scan.lines else "no line of the input file is a valid request"
            )
            self._fail_validation(batch_id, reason)
            return
        self.set_status(batch_id, ["validating"], "in_progress", "in_progress_at")

    def _fail_validation(self, batch_id: str, message: str) -> None:
        raw = self.raw(batch_id)
        errors = json.loads(raw.get("errors") or "[]")
        errors.insert(0, {"code": "invalid_file", "message": message, "param": "input_file_id", "line": None})
        self.r.hset(keys.batch(batch_id), "errors", json.dumps(errors))
        self.set_status(batch_id, ["validating"], "failed", "failed_at")
        if int(raw.get("failed", "0")):
            self._write_files(batch_id, raw)
        self._close(batch_id, raw)
        self._notify(batch_id)

    def fail_validation(self, batch_id: str, message: str) -> None:
        self._fail_validation(batch_id, message)

    def raw(self, batch_id: str) -> dict[str, str]:
        data = cast(dict[str, str], self.r.hgetall(keys.batch(batch_id)))
        if not data:
            raise NotFound(f"batch {batch_id!r} not found", param="batch_id")
        return data

    def get_raw(self, batch_id: str, tenant: str | None) -> dict[str, str]:
        if not valid_object_id(batch_id):
            raise NotFound(f"batch {batch_id!r} not found", param="batch_id")
        data = self.raw(batch_id)
        if tenant is not None and data.get("tenant") != tenant:
            raise NotFound(f"batch {batch_id!r} not found", param="batch_id")
        return data

    def page(self, tenant: str, after: str | None, limit: int) -> tuple[list[dict[str, str]], bool]:
        ids = cast(list[str], self.r.zrevrange(keys.tenant_batches(tenant), 0, -1))
        if after is not None:
            ids = ids[ids.index(after) + 1 :] if after in ids else []
        page = ids[: limit + 1]
        p = self.r.pipeline(transaction=False)
        for batch_id in page[:limit]:
            p.hgetall(keys.batch(batch_id))
        return [d for d in p.execute() if d], len(page) > limit

    def chunks(self, batch_id: str) -> list[Chunk]:
        return [
            Chunk(*json.loads(c)) for c in cast(list[str], self.r.lrange(keys.batch_part(batch_id, "chunks"), 0, -1))
        ]

    def units(self, batch_id: str, only: set[int] | None = None) -> list[LinesUnit]:
        """Work units, one per (chunk, model); with ``only``, just the units holding those lines."""
        units = []
        for c in self.chunks(batch_id):
            for unit in self._chunk_units(batch_id, c):
                if only is not None:
                    lines = unit.only if unit.only is not None else self._chunk_lines(batch_id, c)
                    picked = [x for x in lines if x in only]
                    if not picked:
                        continue
                    unit.only = picked
                units.append(unit)
        return units

    def _chunk_units(self, batch_id: str, c: Chunk) -> list[LinesUnit]:
        return [
            LinesUnit(model=model, batch=batch_id, chunk=c.index, first=c.first, start=c.start, end=c.end, only=lines)
            for model, lines in c.models.items()
        ]

    def _chunk_lines(self, batch_id: str, c: Chunk) -> list[int]:
        key = self.files.key(self.raw(batch_id)["input_file_id"])
        return [idx for idx, _ in iter_range(self.storage.read_range(key, c.start, c.end), c.first)]

    def set_status(self, batch_id: str, allowed: Iterable[str], to: str, *stamps: str) -> bool:
        ok, _ = self._status(keys=[keys.batch(batch_id)], args=[",".join(allowed), to, str(int(time.time())), *stamps])
        if ok:
            self._event(batch_id, {"status": to})
        return bool(ok)

    def _event(self, batch_id: str, data: dict[str, Any]) -> None:
        key = keys.events(batch_id)
        p = self.r.pipeline(transaction=False)
        p.xadd(
            key, {"type": "status", "data": json.dumps(data), "at": repr(time.time())}, maxlen=1000, approximate=True
        )
        p.expire(key, self.ttl)
        p.execute()

    # --- the ledger ---------------------------------------------------------------------------------

    def commit_many(self, batch_id: str, entries: Sequence[tuple[int, str, dict[str, Any], int, int]]) -> int | None:
        """Commit (line, 'out'|'err', line object, input tokens, output tokens) entries; returns what remains."""
        if not entries:
            return None
        names = [keys.batch(batch_id), *(keys.batch_part(batch_id, part) for part in ("out", "err", "done"))]
        now = str(int(time.time()))
        p = self.r.pipeline(transaction=False)
        for line, kind, obj, tin, tout in entries:
            self._commit(
                keys=names,
                args=[line, kind, json.dumps(obj, ensure_ascii=False, separators=(",", ":")), tin, tout, now],
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

    def open_units(self, batch_id: str) -> list[LinesUnit]:
        """The batch's work units that still have uncommitted lines: one read of its chunks and bitmap."""
        done = Bitmap(cast(bytes, self.r.execute_command("GET", keys.batch_part(batch_id, "done"), **_RAW) or b""))
        out = []
        for c in self.chunks(batch_id):
            for unit in self._chunk_units(batch_id, c):
                if unit.only is not None:
                    left = any(not done.has(i) for i in unit.only)
                elif c.last is None or c.count is None:  # recorded before chunks kept their line count
                    left = any(not done.has(i) for i in self._chunk_lines(batch_id, c))
                else:
                    left = done.count(c.first, c.last) < c.count
                if left:
                    out.append(unit)
        return out

    def close_unit(self, unit: LinesUnit, code: str, message: str) -> int:
        """Commit the unit's uncommitted lines as errors (work that can never run); returns how many."""
        key = self.files.key(self.raw(unit.batch)["input_file_id"])
        entries = self._error_entries(unit.batch, key, unit.first, unit.start, unit.end, unit.only, code, message)
        self.commit_many(unit.batch, entries)
        self.maybe_finalize(unit.batch)
        return len(entries)

    def _error_entries(
        self,
        batch_id: str,
        input_key: str,
        first: int,
        start: int,
        end: int,
        only: list[int] | None,
        code: str,
        message: str,
    ) -> list[tuple[int, str, dict[str, Any], int, int]]:
        """Error lines for the uncommitted lines of bytes ``[start, end)`` (just ``only``, when given)."""
        wanted = set(only) if only is not None else None
        data = self.storage.read_range(input_key, start, end)
        rows = [(i, line) for i, line in iter_range(data, first) if wanted is None or i in wanted]
        done = self.committed(batch_id, [i for i, _ in rows])
        info = ErrorInfo(code=code, message=message)
        return [
            (i, "err", error_line(custom_id_of(line) or f"line-{i + 1}", info), 0, 0)
            for i, line in rows
            if i not in done
        ]

    def bump_deliveries(self, batch_id: str, lines: Sequence[int]) -> list[int]:
        p = self.r.pipeline(transaction=False)
        for line in lines:
            p.hincrby(keys.batch_part(batch_id, "tries"), str(line), 1)
        return [int(x) for x in p.execute()]

    def stopped(self, batch_ids: Sequence[str]) -> set[str]:
        """Batches whose lines must stop running (cancelled, expired or otherwise over)."""
        p = self.r.pipeline(transaction=False)
        for batch_id in batch_ids:
            p.hget(keys.batch(batch_id), "status")
        return {b for b, st in zip(batch_ids, p.execute(), strict=True) if st is None or st in ("cancelling", *DONE)}

    def remaining(self, raw: dict[str, str]) -> int:
        return int(raw.get("total", 0)) - int(raw.get("completed", 0)) - int(raw.get("failed", 0))

    def partial_output(self, batch_id: str, errors: bool = False) -> bytes:
        """Committed lines so far (after any earlier output file), for downloads while in progress."""
        raw = self.raw(batch_id)
        parts: list[bytes] = []
        prev = raw.get("prev_output_file_id") if not errors else None
        if prev:
            parts.append(self.storage.get_bytes(self.files.key(prev)))
        hash_key = keys.batch_part(batch_id, "err" if errors else "out")
        values = cast(dict[str, str], self.r.hgetall(hash_key))
        if not values and not errors and raw.get("output_file_id"):
            return self.storage.get_bytes(self.files.key(raw["output_file_id"]))
        parts.extend((v + "\n").encode() for _, v in sorted(values.items(), key=lambda kv: int(kv[0])))
        return b"".join(parts)

    # --- ending -------------------------------------------------------------------------------------

    def close_out(self, batch_id: str, code: str, message: str) -> None:
        """Commit every remaining line as an error (``batch_cancelled`` / ``batch_expired``)."""
        key = self.files.key(self.raw(batch_id)["input_file_id"])
        entries = []
        for c in self.chunks(batch_id):
            entries += self._error_entries(batch_id, key, c.first, c.start, c.end, None, code, message)
        for start in range(0, len(entries), 1000):
            self.commit_many(batch_id, entries[start : start + 1000])

    def cancel(self, batch_id: str) -> None:
        if not self.set_status(batch_id, ["validating", "in_progress"], "cancelling", "cancelling_at"):
            status = self.raw(batch_id).get("status")
            if status in ("cancelling", "cancelled"):
                return
            raise Conflict(f"batch {batch_id} is {status}; only a running batch can be cancelled")
        self.close_out(batch_id, "batch_cancelled", "the batch was cancelled before this request ran")
        self.maybe_finalize(batch_id)

    def maybe_expire(self, batch_id: str, raw: dict[str, str] | None = None) -> bool:
        raw = raw or self.raw(batch_id)
        if raw.get("status") not in ("in_progress",) or time.time() < int(raw.get("expires_at", "0")):
            return False
        self.close_out(
            batch_id, "batch_expired", "This request could not be executed before the completion window expired."
        )
        self.r.hset(keys.batch(batch_id), "expiring", "1")
        self.maybe_finalize(batch_id)
        return True

    def maybe_finalize(self, batch_id: str) -> bool:
        """Finalize if nothing remains and no live finalizer holds the batch; safe to call anytime."""
        raw = self.raw(batch_id)
        if self.remaining(raw) > 0:
            return False
        status = raw.get("status")
        now = int(time.time())
        if status == "finalizing":
            if now - int(raw.get("finalizing_at", now)) < FINALIZE_STALE_S:
                return False
            claimed = self.set_status(batch_id, ["finalizing"], "finalizing", "finalizing_at")
        elif status == "cancelling":
            claimed = self.set_status(batch_id, ["cancelling"], "cancelling", "cancelling_at")
        else:
            claimed = self.set_status(batch_id, ["in_progress"], "finalizing", "finalizing_at")
        if not claimed:
            return False
        raw = self.raw(batch_id)
        self._write_files(batch_id, raw)
        if status == "cancelling":
            final, stamp = "cancelled", "cancelled_at"
        elif raw.get("expiring"):
            final, stamp = "expired", "expired_at"
        else:
            final, stamp = "completed", "completed_at"
        self.set_status(batch_id, ["finalizing", "cancelling"], final, stamp)
        self._close(batch_id, raw)
        self._notify(batch_id)
        return True

    def _notify(self, batch_id: str) -> None:
        raw = self.raw(batch_id)
        if raw.get("webhook_url"):
            webhooks.deliver(raw["webhook_url"], {"id": batch_id, "status": raw["status"]}, self.webhook_secret)

    def _write_files(self, batch_id: str, raw: dict[str, str]) -> None:
        tenant = raw["tenant"]
        out = self.partial_output(batch_id)
        out_file = self.files.create_bytes(tenant, f"{batch_id}_output.jsonl", "batch_output", out)
        fields: dict[Any, Any] = {"output_file_id": out_file.id}
        errs = self.partial_output(batch_id, errors=True)
        if errs:
            fields["error_file_id"] = self.files.create_bytes(
                tenant, f"{batch_id}_error.jsonl", "batch_output", errs
            ).id
        p = self.r.pipeline()
        p.hset(keys.batch(batch_id), mapping=fields)
        p.hdel(keys.batch(batch_id), "prev_output_file_id")
        # The output now lives in its file; the done bitmap keeps commits exactly-once from here on.
        p.delete(keys.batch_part(batch_id, "out"))
        p.execute()

    def _close(self, batch_id: str, raw: dict[str, str]) -> None:
        p = self.r.pipeline()
        tokens = int(raw.get("tokens") or 0)
        if tokens:
            p.decrby(keys.tenant_tokens(raw["tenant"]), tokens)
            p.hset(keys.batch(batch_id), "tokens", "0")
        p.srem(keys.tenant_open_batches(raw["tenant"]), batch_id)
        p.srem(keys.OPEN_BATCHES, batch_id)
        p.hdel(keys.batch(batch_id), "expiring")
        for part in ("", ":err", ":done", ":tries", ":chunks"):
            p.expire(f"{keys.batch(batch_id)}{part}", self.ttl)
        p.execute()

    def retry(self, batch_id: str, codes: set[str] | None) -> list[int]:
        """Reopen a finished batch for its failed lines (all, or those with the given error codes)."""
        raw = self.raw(batch_id)
        if raw.get("status") not in ("completed", "expired", "cancelled"):
            raise Conflict(f"batch {batch_id} is {raw.get('status')}; only a finished batch can be retried")
        errs = cast(dict[str, str], self.r.hgetall(keys.batch_part(batch_id, "err")))
        picked = []
        for key, obj in errs.items():
            data = json.loads(obj)
            code = (data.get("error") or {}).get("code") or ((data.get("response") or {}).get("body") or {}).get(
                "error", {}
            ).get("code")
            if (data.get("response") or {}).get("status_code") == 400 and code not in (codes or set()):
                continue  # invalid requests fail the same way again unless asked for by code
            if codes is None or code in codes:
                picked.append(int(key))
        if not picked:
            return []
        p = self.r.pipeline()
        for line in picked:
            p.hdel(keys.batch_part(batch_id, "err"), str(line))
            p.setbit(keys.batch_part(batch_id, "done"), line, 0)
            p.hdel(keys.batch_part(batch_id, "tries"), str(line))
        now = int(time.time())
        p.hincrby(keys.batch(batch_id), "failed", -len(picked))
        p.hset(
            keys.batch(batch_id),
            mapping={
                "prev_output_file_id": raw.get("output_file_id", ""),
                "expires_at": str(now + WINDOW_S),
                "status": "in_progress",
                "in_progress_at": str(now),
            },
        )
        p.hdel(
            keys.batch(batch_id),
            "output_file_id",
            "error_file_id",
            "completed_at",
            "expired_at",
            "cancelled_at",
            "cancelling_at",
            "finalizing_at",
        )
        p.sadd(keys.tenant_open_batches(raw["tenant"]), batch_id)
        p.sadd(keys.OPEN_BATCHES, batch_id)
        p.execute()
        self._event(batch_id, {"status": "in_progress", "retried_lines": len(picked)})
        return sorted(picked)


def to_openai(raw: dict[str, str]) -> dict[str, Any]:
    """The OpenAI Batch object for a stored batch."""

    def ts(name: str) -> int | None:
        value = raw.get(name)
        return int(value) if value else None

    errors = json.loads(raw.get("errors") or "[]")
    input_tokens, output_tokens = int(raw.get("input_tokens", 0)), int(raw.get("output_tokens", 0))
    return {
        "id": raw["id"],
        "object": "batch",
        "endpoint": raw["endpoint"],
        "model": raw.get("model") or None,
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": raw["input_file_id"],
        "completion_window": raw.get("completion_window", "24h"),
        "status": raw["status"],
        "output_file_id": raw.get("output_file_id") or None,
        "error_file_id": raw.get("error_file_id") or None,
        "created_at": int(raw["created_at"]),
        "in_progress_at": ts("in_progress_at"),
        "expires_at": ts("expires_at"),
        "finalizing_at": ts("finalizing_at"),
        "completed_at": ts("completed_at"),
        "failed_at": ts("failed_at"),
        "expired_at": ts("expired_at"),
        "cancelling_at": ts("cancelling_at"),
        "cancelled_at": ts("cancelled_at"),
        "request_counts": {
            "total": int(raw.get("total", 0)),
            "completed": int(raw.get("completed", 0)),
            "failed": int(raw.get("failed", 0)),
        },
        "metadata": json.loads(raw.get("metadata") or "null"),
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }
