"""Test helpers: settings pointed at the test Redis, a temporary storage root and the tiny models."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from queueformer.contract.settings import Settings, load_settings


def make_settings(redis_url: str, tmp_path: Path, models_dir: Path | None = None, **overrides: Any) -> Settings:
    return load_settings(
        redis_url=redis_url,
        data_dir=tmp_path / "data",
        storage_url=f"file://{tmp_path / 'storage'}",
        models_dir=models_dir or tmp_path / "models",
        **overrides,
    )


def eventually(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll until ``check`` returns something truthy; fail with the last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    import json

    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def queued(client: Any, queue: str) -> int:
    """Messages waiting in ``queue``: kombu keeps one Redis list per priority."""
    from queueformer.server import keys

    return sum(int(client.llen(name)) for name in keys.queue_lists(queue))


def pop(client: Any, queue: str) -> Any:
    """Take the next message as a consumer would (the most urgent priority list first), or None."""
    from queueformer.server import keys

    for name in keys.queue_lists(queue):
        raw = client.rpop(name)
        if raw is not None:
            return raw
    return None


def messages(client: Any, queue: str) -> list[Any]:
    """Every message waiting in ``queue``, across its priority lists."""
    from queueformer.server import keys

    return [m for name in keys.queue_lists(queue) for m in client.lrange(name, 0, -1)]
