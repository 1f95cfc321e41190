"""The worker's lane: every engine's turns and every model load on one thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from workers.engine.lane import Lane, on_own_thread


class Counter:
    """An engine that has ``work`` turns to take and records the thread each ran on."""

    def __init__(self, name: str, work: int = 0, pause: float = 0.0) -> None:
        self.name = name
        self.work = work
        self.pause = pause
        self.threads: set[int] = set()
        self.order: list[str] = []
        self.running = threading.Event()

    def ready(self) -> bool:
        return self.work > 0

    def turn(self) -> None:
        self.running.set()
        self.threads.add(threading.get_ident())
        # torch work of the size that enters a parallel region (over the 32k-element grain)
        torch.ones(256, 256).matmul(torch.ones(256, 256)).sum()
        time.sleep(self.pause)
        self.work -= 1
        self.running.clear()


def wait_for(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_every_engine_and_every_call_runs_on_the_one_lane_thread() -> None:
    lane = Lane("t")
    a, b = Counter("a", work=20), Counter("b", work=20)
    try:
        loader = lane.call(threading.get_ident)  # what model loading runs through
        lane.add(a)
        lane.add(b)
        wait_for(lambda: a.work == 0 and b.work == 0)
        assert a.threads == b.threads == {loader}
        assert loader != threading.get_ident()
        assert lane.call(threading.get_ident) == loader
    finally:
        lane.stop()
    assert not lane.alive


def test_engines_take_turns_instead_of_one_running_dry_first() -> None:
    lane = Lane("t")
    log: list[str] = []

    class Logged(Counter):
        def turn(self) -> None:
            log.append(self.name)
            super().turn()

    a, b = Logged("a", work=5), Logged("b", work=5)
    try:

        def both() -> None:  # both in place before the first turn
            lane.add(a)
            lane.add(b)

        lane.call(both)
        wait_for(lambda: a.work == 0 and b.work == 0)
    finally:
        lane.stop()
    assert log == ["a", "b"] * 5


def test_new_work_wakes_an_idle_lane_and_a_removed_engine_gets_no_more_turns() -> None:
    lane = Lane("t", idle_wait_s=600)  # an idle lane only looks again when woken
    a = Counter("a", pause=0.05)
    try:
        lane.add(a)
        time.sleep(0.1)  # idle: waiting, not turning
        a.work = 3
        lane.wake()
        wait_for(lambda: a.work == 0)
        a.work = 100
        lane.wake()
        wait_for(a.running.is_set)
        lane.remove(a)
        assert not a.running.is_set()  # remove returned after the turn in progress ended
        left = a.work
        time.sleep(0.2)
        assert a.work == left
    finally:
        lane.stop()


def test_a_call_raises_what_its_function_raised_and_a_stopped_lane_refuses_calls() -> None:
    lane = Lane("t")

    def broken() -> None:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        lane.call(broken)
    assert lane.call(lambda: 7) == 7  # the lane survived it
    lane.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        lane.call(lambda: 1)


def test_work_on_its_own_thread_returns_or_raises_and_leaves_no_thread_behind() -> None:
    seen: list[threading.Thread] = []

    def train() -> int:
        seen.append(threading.current_thread())
        torch.ones(256, 256).matmul(torch.ones(256, 256)).sum()
        return 3

    assert on_own_thread(train, "fine-tune-x") == 3
    assert seen[0] is not threading.current_thread() and seen[0].name == "fine-tune-x"
    assert not seen[0].is_alive()  # its OpenMP team went with it

    def broken() -> int:
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        on_own_thread(broken, "fine-tune-y")
