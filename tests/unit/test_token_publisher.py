"""Streamed tokens are published in order, and a flush waits for every token queued before it."""

from __future__ import annotations

import threading
import time

from workers.watch import TokenPublisher


def test_flush_returns_only_after_every_earlier_token_is_published() -> None:
    published: list[tuple[str, int, str]] = []
    gate = threading.Event()

    def slow_publish(batch: list[tuple[str, int, str]]) -> None:
        gate.wait(5)  # the first batch is held until the flush below is already waiting
        time.sleep(0.05)
        published.extend(batch)

    publisher = TokenPublisher(slow_publish)
    on_token = publisher.callback("job-1")
    for i, text in enumerate([" sleeps", " on", " the", " warm", " windows", "ill"]):
        on_token(0, i, text)
    threading.Timer(0.1, gate.set).start()
    publisher.flush()
    assert "".join(t for _, _, t in published) == " sleeps on the warm windowsill"
    publisher.flush_and_stop()


def test_flush_after_stop_does_not_wait() -> None:
    publisher = TokenPublisher(lambda batch: None)
    publisher.flush_and_stop()
    started = time.monotonic()
    publisher.flush(timeout=5)
    assert time.monotonic() - started < 1
