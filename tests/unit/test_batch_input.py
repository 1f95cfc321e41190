"""Splitting a batch input file into lines: block by block, with a per-line byte cap."""

from __future__ import annotations

import io
import random

from queueformer.server.batch_input import iter_range, split_lines


def reference(data: bytes, cap: int) -> list[tuple[int, int, bytes | None]]:
    out, start = [], 0
    parts = data.split(b"\n")
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        if last and not part:
            break
        end = start + len(part) + (0 if last else 1)
        out.append((start, end, part if len(part) <= cap else None))
        start = end
    return out


def test_lines_match_a_plain_split_whatever_the_block_size() -> None:
    rng = random.Random(7)
    for _ in range(300):
        data = bytes(rng.choice(b"ab\n\r ") for _ in range(rng.randrange(0, 60)))
        cap = rng.randrange(1, 8)
        for block in (1, 2, 3, 5, 64):
            assert list(split_lines(io.BytesIO(data), cap, block)) == reference(data, cap), (data, cap, block)


def test_a_line_over_the_cap_is_counted_and_skipped_and_the_next_line_is_whole() -> None:
    data = b'{"a":1}\n' + b"x" * 100 + b"\n\n" + b'{"b":2}'
    got = list(split_lines(io.BytesIO(data), 10, block=16))
    assert got == [(0, 8, b'{"a":1}'), (8, 109, None), (109, 110, b""), (110, 117, b'{"b":2}')]


def test_chunk_reads_split_lines_the_same_way_as_the_scan() -> None:
    # A bare \r inside a line is not a line break anywhere (bytes.splitlines would say it is).
    data = b'{"custom_id": "a",\r "x": 1}\n\n{"custom_id": "b"}\n'
    scanned = [(i, line) for i, (_, _, line) in enumerate(split_lines(io.BytesIO(data), 1 << 20)) if line]
    assert list(iter_range(data, 0)) == scanned == [(0, b'{"custom_id": "a",\r "x": 1}'), (2, b'{"custom_id": "b"}')]
