"""A batch's input file, read once when the batch is created: every line validated, lines cut into chunks.

Validation streams the file in fixed-size blocks: each non-blank line is checked against the batch's
endpoint, its model and the caller's rules (registry, context window); bad lines and duplicate
``custom_id``s are recorded with their line numbers and never stop the rest. Cheap hostile files cost
little: every line, blank or not, counts toward the line limit (a file of newlines is refused after
``max_lines``, not walked to its end), and a line longer than ``max_line_bytes`` is a per-line error that
is skipped without ever being held whole. Lines split on ``\n`` only, here and wherever a chunk is read
again, so line numbers always agree. Valid lines are cut into chunks: byte ranges of the input file, so
a broker message names a range instead of carrying its lines; an over-long line never lies inside one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

from queueformer.contract.errors import QueueformerError
from queueformer.contract.openai_batch import LineError, parse_line
from queueformer.contract.prefix import prefix_key
from queueformer.contract.tasks import AnyJob, estimate_tokens
from queueformer.server.storage import Storage


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
    oversized: set[int] = field(default_factory=set)  # lines over the byte cap: never inside a chunk
    line_keys: dict[int, str] = field(default_factory=dict)  # valid line -> its prompt-prefix key, when it has one

    @property
    def models(self) -> list[str]:
        return sorted(set(self.line_models.values()))

    def chunks(self, size: int) -> list[Chunk]:
        """Runs of up to ``size`` lines as byte ranges of the input file.

        A run never spans an over-long line, so no worker (nor a cancel closing the rest) ever reads one.
        Lines whose prompts share a prefix (``line_keys``) go to the same run where they fit, so one
        worker's engine prefills that prefix once; such a run may skip lines, and then names its lines.
        """
        segments: list[list[tuple[int, int, int]]] = [[]]
        for line in self.lines:
            if line[0] in self.oversized:
                segments.append([])
            else:
                segments[-1].append(line)
        runs = [run for seg in segments if seg for run in self._runs(seg, size)]
        at = {line[0]: i for i, line in enumerate(self.lines)}  # position among the non-blank lines
        out = []
        for n, part in enumerate(runs):
            per_model: dict[str, list[int]] = {}
            for idx, _, _ in part:
                if idx in self.line_models:
                    per_model.setdefault(self.line_models[idx], []).append(idx)
            if not per_model:
                continue  # nothing valid to run here: every line is already in the error file
            ordered = sorted(part)
            first = at[ordered[0][0]]
            contiguous = [at[line[0]] for line in part] == list(range(first, first + len(part)))
            models: dict[str, list[int] | None] = (
                dict.fromkeys(per_model) if len(per_model) == 1 and contiguous else dict(per_model)
            )
            out.append(Chunk(n, ordered[0][0], ordered[0][1], ordered[-1][2], models, ordered[-1][0], len(part)))
        return out

    def _runs(self, lines: list[tuple[int, int, int]], size: int) -> list[list[tuple[int, int, int]]]:
        """Lines cut into runs of at most ``size``: consecutive, but lines sharing a prefix key kept together."""
        groups: dict[object, list[tuple[int, int, int]]] = {}
        for line in lines:
            key = self.line_keys.get(line[0])
            groups.setdefault(key if key is not None else ("line", line[0]), []).append(line)
        runs: list[list[tuple[int, int, int]]] = [[]]
        for group in groups.values():  # in order of first appearance: without shared keys, file order
            if runs[-1] and len(runs[-1]) + len(group) > size and len(group) <= size:
                runs.append([])  # a group that fits in one run is not split across two
            for line in group:
                if len(runs[-1]) >= size:
                    runs.append([])
                runs[-1].append(line)
        return [r for r in runs if r]


LineCheck = Callable[[AnyJob], None]


READ_BLOCK = 1 << 20


def split_lines(fh: IO[bytes], max_line_bytes: int, block: int = READ_BLOCK) -> Iterator[tuple[int, int, bytes | None]]:
    """``(start, end, line)`` for each line of ``fh`` split on ``\\n``, read ``block`` bytes at a time.

    ``line`` (without its newline) is ``None`` when longer than ``max_line_bytes``: such a line is
    counted and skipped, and never held in memory beyond one block.
    """
    start = 0
    size = 0  # bytes of the current line so far, newline excluded
    held: list[bytes] = []
    while chunk := fh.read(block):
        pos = 0
        while pos < len(chunk):
            nl = chunk.find(b"\n", pos)
            stop = len(chunk) if nl < 0 else nl
            size += stop - pos
            if size <= max_line_bytes:
                held.append(chunk[pos:stop])
            elif held:
                held = []  # over the cap: let go of what was kept
            if nl < 0:
                break
            yield start, start + size + 1, b"".join(held) if size <= max_line_bytes else None
            start += size + 1
            size, held, pos = 0, [], nl + 1
    if size:
        yield start, start + size, b"".join(held) if size <= max_line_bytes else None


def scan_file(
    storage: Storage,
    key: str,
    endpoint: str,
    max_lines: int,
    check: LineCheck | None = None,
    max_line_bytes: int = 1 << 20,
) -> Scan:
    """Validate every line of an input file in one streaming pass; ``check`` adds caller rules (registry).

    Raises ``TooManyLines`` once the file has more than ``max_lines`` lines, blank ones included.
    """
    lines: list[tuple[int, int, int]] = []
    errors: list[tuple[int, str | None, LineError]] = []
    line_models: dict[int, str] = {}
    oversized: set[int] = set()
    line_keys: dict[int, str] = {}
    seen: set[str] = set()
    tokens = 0
    with storage.open_read(key) as fh:
        for index, (start, end, raw) in enumerate(split_lines(fh, max_line_bytes)):
            if index >= max_lines:
                raise TooManyLines(max_lines)
            if raw is None:
                lines.append((index, start, end))
                oversized.add(index)
                size = end - start
                message = f"line is {size} bytes long; the limit is {max_line_bytes} bytes (quota.max_line_bytes)"
                errors.append((index, None, LineError("line_too_long", message, None, "line")))
                continue
            if not raw.strip():
                continue
            lines.append((index, start, end))
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
                shared = prefix_key(job)
                if shared is not None:
                    line_keys[index] = f"{job.model}\0{shared}"
                tokens += estimate_tokens(job)
            except LineError as err:
                errors.append((index, err.custom_id, err))
            except QueueformerError as err:
                errors.append(
                    (index, custom_id_of(raw), LineError(err.code, err.message, custom_id_of(raw), err.param))
                )
    return Scan(
        lines=lines, errors=errors, line_models=line_models, tokens=tokens, oversized=oversized, line_keys=line_keys
    )


def custom_id_of(raw: bytes) -> str | None:
    try:
        value = json.loads(raw).get("custom_id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


class TooManyLines(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the input file has more than {limit} lines (blank lines count)")
        self.limit = limit


def iter_range(data: bytes, first: int) -> Iterator[tuple[int, bytes]]:
    """(physical line index, line) for the non-blank lines of a chunk's bytes (split as ``split_lines`` does)."""
    for offset, raw in enumerate(data.split(b"\n")):
        if raw.strip():
            yield first + offset, raw
