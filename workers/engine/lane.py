"""The one thread that runs a worker's model work: every engine takes turns on it.

Engines used to own a thread each. On a CPU that halves throughput as soon as a second one has run
anything: torch's OpenMP runtime (libgomp) gives every thread that enters a parallel region a team of
its own that lives as long as the thread, and once the process holds more team threads than cores it
stops spinning between parallel regions and sleeps on a futex instead, so every op of the busy engine
pays a wake-up. Measured on 2 cores: a 1,536-line long-tail batch ran at 5,800 tokens/s on a worker
whose other model had never run and at 3,650 after it had; a matmul loop took 1.1 s on one thread and
2.2 s on the same thread after a second thread ran 100 ops and went idle. On a GPU, work from several
threads serialises on the device anyway.

So a worker has one lane: engines submit nothing to torch themselves; the lane calls each engine's
``turn`` (one decode step, one batch) while it has work, round-robin, and sleeps when none has. Model
loading runs on the lane too (``call``), so no other thread of the process ever owns a team, and a
CUDA context is created by the thread that uses it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol, TypeVar

T = TypeVar("T")

IDLE_WAIT_S = 0.5  # a lane with nothing to do still looks around this often (stop requests)


class Turns(Protocol):
    """An engine as a lane runs it."""

    name: str

    def ready(self) -> bool:
        """Whether a turn now would do work (read on the lane's thread)."""
        ...

    def turn(self) -> None:
        """One bounded piece of work (a decode step, a batch); records its own failures, never raises."""
        ...


class Lane:
    """Runs its engines' turns, and any ``call``, on one thread."""

    def __init__(self, name: str, idle_wait_s: float = IDLE_WAIT_S) -> None:
        self.name = name
        self.idle_wait_s = idle_wait_s
        self._engines: list[Turns] = []
        self._calls: queue.SimpleQueue[tuple[Callable[[], object], Future[object]]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards the engine list and the thread's start
        self._turning = threading.Lock()  # held for each turn: a removed engine's turn has ended
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- from any thread ----------------------------------------------------------------------------

    def add(self, engine: Turns) -> None:
        with self._lock:
            self._engines.append(engine)
            self._start()
        self.wake()

    def remove(self, engine: Turns) -> None:
        """Take ``engine`` off the lane; on return none of its turns is running or will run."""
        with self._lock:
            if engine in self._engines:
                self._engines.remove(engine)
        if not self.on_lane():
            with self._turning:
                pass

    def wake(self) -> None:
        self._wake.set()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the lane's thread between turns and return what it returns (or raise what it raised)."""
        if self.on_lane():
            return fn()
        done: Future[object] = Future()
        with self._lock:
            if self._stopping:
                raise RuntimeError(f"lane {self.name} is stopped")
            self._start()
            self._calls.put((fn, done))
        self.wake()
        return done.result()  # type: ignore[return-value]

    def on_lane(self) -> bool:
        return threading.current_thread() is self._thread

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            thread = self._thread
        self.wake()
        if thread is not None and not self.on_lane():
            thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the lane's thread ---------------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"lane-{self.name}", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wake.clear()  # before looking: a wake() from here on ends the wait below at once
            self._run_calls()
            with self._lock:
                if self._stopping:
                    break
                engines = list(self._engines)
            busy = False
            for engine in engines:
                with self._turning:
                    if engine not in self._engines or not engine.ready():
                        continue
                    engine.turn()
                busy = True
            if not busy:
                self._wake.wait(self.idle_wait_s)
        self._run_calls()

    def _run_calls(self) -> None:
        while True:
            try:
                fn, done = self._calls.get_nowait()
            except queue.Empty:
                return
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)


def run_on(lane: Lane | None, fn: Callable[[], T]) -> T:
    """``fn()`` on ``lane``'s thread, or here when there is no lane (an engine that gets a thread of its own)."""
    return lane.call(fn) if lane is not None else fn()


def on_own_thread(fn: Callable[[], T], name: str) -> T:
    """Run ``fn`` on a new thread that ends with it, and return what it returns (or raise what it raised).

    For long device work beside the lane (a fine-tune): the OpenMP team its thread gets ends with the
    thread, where a worker's task thread would keep it, and slow the lane, for the worker's life.
    """
    done: Future[T] = Future()

    def target() -> None:
        try:
            done.set_result(fn())
        except BaseException as exc:  # handed to the caller
            done.set_exception(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    return done.result()


__all__ = ["Lane", "Turns", "on_own_thread", "run_on"]
