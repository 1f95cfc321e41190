"""The live fleet: each worker announces what it serves, refreshed on a short TTL.

A worker that stops refreshing (killed, hung) drops out within one TTL, so ``/v1/models`` shows only
workers that are alive, with the placement, dtype, quantization and memory each one really loaded.
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

import redis

from queueformer.server import keys

TTL_S = 30


class Fleet:
    """Worker announcements in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def announce(self, worker_id: str, info: dict[str, Any], ttl_s: int = TTL_S) -> None:
        self.r.set(keys.worker(worker_id), json.dumps({**info, "id": worker_id, "seen_at": time.time()}), ex=ttl_s)

    def leave(self, worker_id: str) -> None:
        self.r.delete(keys.worker(worker_id))

    def members(self) -> list[dict[str, Any]]:
        names = list(self.r.scan_iter(match=keys.WORKERS_PATTERN, count=500))
        if not names:
            return []
        values = cast(list[str | None], self.r.mget(names))
        return [json.loads(v) for v in values if v]

    def by_model(self) -> dict[str, list[dict[str, Any]]]:
        """Model name -> the live workers serving it, with what each loaded."""
        out: dict[str, list[dict[str, Any]]] = {}
        for w in self.members():
            for name, loaded in (w.get("models") or {}).items():
                out.setdefault(name, []).append(
                    {
                        "worker": w["id"],
                        "ready": w.get("ready", False),
                        "healthy": w.get("healthy", True),
                        "slots": w.get("slots"),
                        "line_slots": w.get("line_slots"),
                        **loaded,
                    }
                )
        return out
