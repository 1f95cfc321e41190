"""How many batch lines go into one message, from what the fleet announces."""

from __future__ import annotations

import pytest

from api.routes.batches import MAX_CHUNK, MIN_CHUNK, lines_per_chunk
from workers.lines import Throughput


def test_before_any_rate_is_measured_a_message_holds_one_engine_batch() -> None:
    assert lines_per_chunk([{"slots": 16}], max_batch_size=256, target_s=2.0) == 256
    assert lines_per_chunk([], max_batch_size=64, target_s=2.0) == 64


def test_chunks_hold_target_seconds_of_work_at_the_measured_rate() -> None:
    workers = [{"slots": 8, "lines_per_s": 40.0}, {"slots": 8, "lines_per_s": 60.0}]
    assert lines_per_chunk(workers, max_batch_size=64, target_s=2.0) == 100


def test_consumer_slots_together_always_hold_two_engine_batches() -> None:
    # 2 s at 7 lines/s is 14 lines; 16 slots x 14 = 224 rows would leave a 256-row engine short, and a
    # slot waits for its chunk's slowest line, so one batch's worth would not keep the engine full either.
    workers = [{"slots": 16, "lines_per_s": 7.0}]
    size = lines_per_chunk(workers, max_batch_size=256, target_s=2.0)
    assert size == 32 and size * 16 >= 2 * 256
    # The smallest worker decides: its slots must fill its engine too.
    workers = [{"slots": 16, "lines_per_s": 7.0}, {"slots": 4, "lines_per_s": 7.0}]
    assert lines_per_chunk(workers, max_batch_size=256, target_s=2.0) == 128


def test_chunk_sizes_stay_within_bounds() -> None:
    assert lines_per_chunk([{"slots": 64, "lines_per_s": 0.5}], max_batch_size=8, target_s=2.0) == MIN_CHUNK
    assert lines_per_chunk([{"slots": 1, "lines_per_s": 1e6}], max_batch_size=64, target_s=2.0) == MAX_CHUNK
    # Workers announced before slots were part of the announcement: the rate alone decides.
    assert lines_per_chunk([{"lines_per_s": 10.0}], max_batch_size=256, target_s=2.0) == 20


def test_chunks_fill_an_engine_batch_across_the_slots_a_worker_gives_batch_lines() -> None:
    # A worker keeps one of its 16 slots for jobs: 15 chunks must hold 2 x 256 rows, so 35 lines each.
    workers = [{"slots": 16, "line_slots": 15, "lines_per_s": 7.0}]
    assert lines_per_chunk(workers, max_batch_size=256, target_s=2.0) == 35


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_worker_rate_counts_busy_time_only() -> None:
    clock = _Clock()
    rates = Throughput(clock=clock)
    # a warm-up chunk of 8 lines, then ten idle minutes, then 600 lines in 10 s of work
    clock.now += 1.0
    rates.add("m", 8, started=clock.now - 1.0)
    clock.now += 600.0
    begun = clock.now
    clock.now += 5.0
    rates.add("m", 300, started=begun)
    clock.now += 5.0
    rates.add("m", 300, started=begun + 5.0)  # overlaps nothing idle: same window
    assert rates.rates["m"] == pytest.approx(60.0)  # not 616 lines over 611 s


def test_worker_rate_windows_span_overlapping_chunks() -> None:
    clock = _Clock()
    rates = Throughput(clock=clock)
    start = clock.now
    for i in range(1, 7):  # chunks started together finish one per second: one busy window
        clock.now = start + i
        rates.add("m", 50, started=start)
    assert rates.rates["m"] == pytest.approx(50.0)


def test_back_to_back_chunks_of_one_slot_stay_in_one_window() -> None:
    clock = _Clock()
    rates = Throughput(clock=clock)
    for _ in range(3):  # 2 s chunks of 40 lines, each taken a few milliseconds after the last
        begun = clock.now + 0.005
        clock.now = begun + 2.0
        rates.add("m", 40, started=begun)
    assert rates.rates["m"] == pytest.approx(120 / 6.0, rel=0.01)
