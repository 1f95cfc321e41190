"""Models produced by fine-tune jobs: registry entries added at run time, kept in Redis.

The API merges them into the static registry on every request (``Registry.with_entries``), so a
fine-tuned model is servable the moment its job succeeds; serving workers look them up here when a job
names a model they have not loaded yet. Static entries win on a name clash.

Redis is not trusted to hold code-loading decisions: whoever can write to it must not get code run in a
worker. So every entry is sanitised when written and again when read: it must be a fine-tune's output
(an ``ft:`` name over a base model, weights in a ``models/ftm-…`` directory of the cluster's storage),
it never names a hub id, and it never enables ``trust_remote_code``. Anything else is ignored (and
logged), so a hostile entry is never honoured by the API or a worker.
"""

from __future__ import annotations

import logging
import re
import time
from typing import cast

import redis
from pydantic import ValidationError

from queueformer.contract.errors import InvalidInput
from queueformer.contract.jobs import Task
from queueformer.contract.registry import ModelEntry
from queueformer.server import keys
from queueformer.server.storage import Storage

log = logging.getLogger(__name__)

_MODEL_KEY = re.compile(r"models/ftm-[A-Za-z0-9]{8,64}")


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's shape, ``ft:{base}:{suffix}:{id}``; deterministic, so a re-run job registers the same name."""
    return f"ft:{base}:{suffix or 'custom'}:{job_id.split('-', 1)[-1][:12].lower()}"


def refusal(entry: ModelEntry, storage: Storage | None) -> str | None:
    """Why a run-time entry must not be served, or None when it is a fine-tune's output."""
    if not entry.name.startswith("ft:"):
        return "its name is not a fine-tuned model's (ft:...)"
    if entry.hub_id is not None:
        return "it names a hub id; run-time entries load only fine-tune outputs from storage"
    if entry.task != Task.GENERATE or not entry.base_model:
        return "it is not a generate model over a registered base"
    if entry.path is None or "://" not in entry.path:
        return "its path is not a storage URI"
    if storage is None:
        key = entry.path.split("://", 1)[1]
        return None if re.search(r"/models/ftm-[A-Za-z0-9]{8,64}$", key) else "its path is not a fine-tuned model"
    try:
        key = storage.key_of(entry.path)
    except InvalidInput:
        return "its path is outside the cluster's storage"
    return None if _MODEL_KEY.fullmatch(key) else "its path is not a fine-tuned model's directory"


class ModelOverlay:
    """Run-time registry entries by name, sanitised on the way in and on the way out."""

    def __init__(self, client: redis.Redis, storage: Storage | None = None, serve_queue: str | None = None) -> None:
        self.r = client
        self.storage = storage
        self.serve_queue = serve_queue
        self._warned: set[str] = set()  # the API reads every entry per request: warn once per entry

    def _warn(self, name: str, why: str) -> None:
        if f"{name}\0{why}" not in self._warned:
            self._warned.add(f"{name}\0{why}")
            log.warning("run-time model entry %r: %s", name, why)

    def sanitise(self, entry: ModelEntry) -> ModelEntry | None:
        """The entry as it may be served (remote code off, no hub, the serving queue), or None."""
        why = refusal(entry, self.storage)
        if why is not None:
            self._warn(entry.name, f"ignored: {why}")
            return None
        if entry.trust_remote_code:
            self._warn(entry.name, "asked for trust_remote_code; it stays off")
        update: dict[str, object] = {"trust_remote_code": False, "revision": None, "offload_folder": None}
        if self.serve_queue:
            update["queue"] = self.serve_queue
        return entry.model_copy(update=update)

    def add(self, entry: ModelEntry) -> None:
        clean = self.sanitise(entry)
        if clean is None:
            raise ValueError(f"model entry {entry.name!r} is not a fine-tune's output; not registered")
        if clean.created is None:
            clean = clean.model_copy(update={"created": int(time.time())})
        self.r.hset(keys.MODELS, clean.name, clean.model_dump_json())

    def _parse(self, name: str, raw: str) -> ModelEntry | None:
        try:
            entry = ModelEntry.model_validate_json(raw)
        except ValidationError as exc:
            self._warn(name, f"ignored: malformed ({exc.errors()[0]['msg']})")
            return None
        if entry.name != name:
            self._warn(name, f"ignored: stored under another name ({entry.name!r})")
            return None
        return self.sanitise(entry)

    def get(self, name: str) -> ModelEntry | None:
        raw = cast(str | None, self.r.hget(keys.MODELS, name))
        return self._parse(name, raw) if raw else None

    def entries(self) -> dict[str, ModelEntry]:
        raw = cast(dict[str, str], self.r.hgetall(keys.MODELS))
        parsed = {name: self._parse(name, body) for name, body in raw.items()}
        return {name: entry for name, entry in parsed.items() if entry is not None}

    def remove(self, name: str) -> None:
        self.r.hdel(keys.MODELS, name)
