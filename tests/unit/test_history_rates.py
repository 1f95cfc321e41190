"""Tokens/s from the workers' cumulative count: differences between samples, resets restart from zero."""

from __future__ import annotations

from api.history import rates


def test_rates_are_differences_over_time_stamped_at_the_later_sample() -> None:
    assert rates([(100.0, 0), (110.0, 500), (130.0, 700)]) == [(110.0, 50.0), (130.0, 10.0)]


def test_a_counter_that_went_down_counts_from_zero_and_bad_pairs_are_skipped() -> None:
    # Redis lost the counter between samples: the new value is what was generated since.
    assert rates([(0.0, 1000), (10.0, 40)]) == [(10.0, 4.0)]
    assert rates([(5.0, 10), (5.0, 20)]) == []  # two samples at one instant: no rate
    assert rates([(0.0, 0)]) == [] and rates([]) == []


def test_rates_before_the_window_are_left_out() -> None:
    assert rates([(0.0, 0), (10.0, 10), (20.0, 30)], since=15.0) == [(20.0, 2.0)]
