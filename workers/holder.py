"""The process's one model holder: each served model loaded once, with its handler and engine.

Task threads never load anything; they look a model up here and submit work to its engine. Loading
happens before the worker consumes its first message, in the process that serves it (no fork after).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from queueformer.contract.errors import ModelNotFound
from queueformer.contract.jobs import Task
from queueformer.contract.registry import ModelEntry
from workers import metrics
from workers.engine.batcher import BatchEngine
from workers.engine.decode import DecodeEngine
from workers.engine.lane import Lane, run_on
from workers.handlers import handler_class
from workers.handlers.base import Handler
from workers.loading import Loaded, load

log = logging.getLogger(__name__)


@dataclass
class Served:
    """One loaded model: registry entry, handler and the engine that owns its device work."""

    entry: ModelEntry
    handler: Handler
    engine: DecodeEngine | BatchEngine
    info: dict[str, Any]

    @property
    def healthy(self) -> bool:
        return self.engine.fatal is None and self.engine.lane.alive

    def stop(self) -> None:
        self.engine.stop()


def serve(
    entry: ModelEntry,
    models_dir: Path,
    offload_folder: Path | None = None,
    poll_steps: int = 8,
    loaded: Loaded | None = None,
    lane: Lane | None = None,
) -> Served:
    """Load ``entry`` (unless given its ``loaded`` model) and start its engine on ``lane``.

    The model loads on the lane's thread: the thread that will run it is then the only one of the
    process that torch's thread pools ever served (see ``workers.engine.lane``). Without a lane the
    engine gets a thread of its own.
    """
    if loaded is None and entry.task != Task.ECHO:
        loaded = run_on(lane, lambda: load(entry, models_dir, offload_folder))
    if loaded is not None:
        metrics.MODEL_LOADS.labels(entry.name).inc()
    handler = handler_class(entry.task)(entry, loaded)
    engine: DecodeEngine | BatchEngine
    if handler.batching == "decode":
        assert loaded is not None
        engine = DecodeEngine(
            loaded.model,
            loaded.tokenizer,
            name=entry.name,
            max_batch_size=entry.max_batch_size,
            max_batch_tokens=entry.max_batch_tokens,
            kv_cache_tokens=entry.kv_cache_tokens,
            beam_search=handler.hf_generate,  # type: ignore[attr-defined]
            poll_steps=poll_steps,
            observer=metrics.observe_decode_step,
            prefix_cache_tokens=min(entry.prefix_cache_tokens, entry.kv_cache_tokens // 2),
            prefix_observer=metrics.observe_prefix,
            static_decode=entry.static_decode,
            lane=lane,
        )
    else:
        engine = BatchEngine(
            handler,
            max_batch_size=entry.max_batch_size,
            max_batch_tokens=entry.max_batch_tokens,
            observer=metrics.observe_forward,
            lane=lane,
        )
    info: dict[str, Any] = (
        dict(loaded.info) if loaded else {"device_map": {}, "quantization": "none", "memory_bytes": 0}
    )
    metrics.MODEL_MEMORY.labels(entry.name).set(float(info.get("memory_bytes", 0)))
    return Served(entry=entry, handler=handler, engine=engine, info=info)


class ModelHolder:
    """Every model this process serves, by name.

    Pinned models are added before the worker consumes. A serving worker for fine-tuned models also
    loads them on demand (``on_demand``), keeping the ``capacity`` most recently used; an evicted model's
    pending work fails as transient and is redelivered. Every model's engine runs on the holder's
    ``lane``, the process's one thread for model work; stopping the holder stops it.
    """

    def __init__(
        self, on_demand: Callable[[str], Served] | None = None, capacity: int = 2, lane: Lane | None = None
    ) -> None:
        self.lane = lane if lane is not None else Lane("worker")
        self._served: dict[str, Served] = {}
        self._on_demand = on_demand
        self._capacity = capacity
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._loading = threading.Lock()

    def add(self, served: Served) -> None:
        self._served[served.entry.name] = served

    def get(self, name: str) -> Served:
        served = self._served.get(name)
        if served is None and self._on_demand is not None:
            served = self._load(name, self._on_demand)
        if served is None:
            raise ModelNotFound(f"model {name!r} is not served by this worker", param="model")
        if name in self._recent:
            self._recent.move_to_end(name)
        return served

    def _load(self, name: str, on_demand: Callable[[str], Served]) -> Served:
        with self._loading:  # one load at a time; threads asking for the same model wait for it
            if name in self._served:
                return self._served[name]
            served = on_demand(name)
            self._served[name] = served
            self._recent[name] = None
            while len(self._recent) > self._capacity:
                old, _ = self._recent.popitem(last=False)
                log.info("unloading %s (least recently used)", old)
                self._served.pop(old).stop()
            return served

    def __contains__(self, name: object) -> bool:
        return name in self._served

    def names(self) -> list[str]:
        return sorted(self._served)

    def all(self) -> list[Served]:
        return list(self._served.values())

    @property
    def healthy(self) -> bool:
        return all(s.healthy for s in self._served.values())

    def describe(self) -> dict[str, Any]:
        return {
            name: {"queue": s.entry.queue, "task": s.entry.task.value, **s.info} for name, s in self._served.items()
        }

    def stop(self) -> None:
        for s in self._served.values():
            s.stop()
        self.lane.stop()
