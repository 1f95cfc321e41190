"""Models produced by fine-tune jobs: registry entries added at run time, kept in Redis.

The API merges them into the static registry on every request (``Registry.with_entries``), so a
fine-tuned model is servable the moment its job succeeds; serving workers look them up here when a job
names a model they have not loaded yet. Static entries win on a name clash.
"""

from __future__ import annotations

from typing import cast

import redis

from queueformer.contract.registry import ModelEntry
from queueformer.server import keys


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's shape, ``ft:{base}:{suffix}:{id}``; deterministic, so a re-run job registers the same name."""
    return f"ft:{base}:{suffix or 'custom'}:{job_id.split('-', 1)[-1][:12].lower()}"


class ModelOverlay:
    """Run-time registry entries by name."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def add(self, entry: ModelEntry) -> None:
        self.r.hset(keys.MODELS, entry.name, entry.model_dump_json())

    def get(self, name: str) -> ModelEntry | None:
        raw = cast(str | None, self.r.hget(keys.MODELS, name))
        return ModelEntry.model_validate_json(raw) if raw else None

    def entries(self) -> dict[str, ModelEntry]:
        raw = cast(dict[str, str], self.r.hgetall(keys.MODELS))
        return {name: ModelEntry.model_validate_json(body) for name, body in raw.items()}

    def remove(self, name: str) -> None:
        self.r.hdel(keys.MODELS, name)
