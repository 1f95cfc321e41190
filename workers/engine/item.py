"""A unit of work handed to an engine: one prepared input, its future and its stop conditions."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from queueformer.contract.errors import Cancelled, DeadlineExceeded


def _never() -> bool:
    return False


@dataclass(eq=False)
class WorkItem:
    """What an engine needs to run one item and to stop it early."""

    prepared: Any
    future: Future[Any] = field(default_factory=Future)
    cancelled: Callable[[], bool] = _never
    deadline: float | None = None  # time.monotonic() value
    on_token: Callable[[int, int, str], None] | None = None  # (sequence index, token id, text delta)
    priority: int = 0  # 0 to 9, higher first: engines admit waiting work by priority, then arrival
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None  # set by the decode engine (time to first token)

    def stop_reason(self) -> Exception | None:
        """Why this item must stop now, if it must."""
        if self.cancelled():
            return Cancelled("cancelled while running")
        if self.deadline is not None and time.monotonic() > self.deadline:
            return DeadlineExceeded("the job's deadline passed while it ran")
        return None

    def resolve(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def reject(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
