"""A batch's input file, read once when the batch is created: every line validated, lines cut into chunks.

Validation streams the file: each non-blank line is checked against the batch's endpoint, its model
and the caller's rules (registry, context window); bad lines and duplicate ``custom_id``s are recorded
with their line numbers and never stop the rest. Valid lines are cut into chunks: byte ranges of the
input file, so a broker message names a range instead of carrying its lines.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from queueformer.contract.errors import QueueformerError
from queueformer.contract.openai_batch import LineError, parse_line
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
