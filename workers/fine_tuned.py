"""Fine-tuned models, loaded on demand by the workers of the serving queue.

A fine-tune job registers its result in the Redis overlay with a storage URI; the first job naming
it makes a serving worker download the directory (once, into ``models_dir/.fine-tuned``) and load it
through the same ``from_pretrained`` path as any model, with an adapter merged into its base.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from queueformer.contract.errors import ModelNotFound, WorkerFatal
from queueformer.contract.registry import Registry
from queueformer.server.overlay import ModelOverlay
from queueformer.server.storage import MANIFEST, Storage
from workers.engine.lane import Lane, run_on
from workers.holder import Served, serve
from workers.loading import load_adapter

log = logging.getLogger(__name__)


class FineTunedModels:
    """Turns a fine-tuned model's name into a served model."""

    def __init__(
        self,
        overlay: ModelOverlay,
        registry: Registry,
        storage: Storage,
        models_dir: Path,
        poll_steps: int = 8,
        lane: Lane | None = None,
    ) -> None:
        self.overlay = overlay
        self.registry = registry
        self.storage = storage
        self.models_dir = models_dir
        self.poll_steps = poll_steps
        self.lane = lane  # where the models load and run (the worker's lane)

    def __call__(self, name: str) -> Served:
        entry = self.overlay.get(name)
        if entry is None or entry.path is None:
            raise ModelNotFound(f"model {name!r} is not a registered fine-tuned model", param="model")
        key = self.storage.key_of(entry.path)
        local = self.models_dir / ".fine-tuned" / key.rsplit("/", 1)[-1]
        manifest = self.storage.get_bytes(f"{key}/{MANIFEST}")
        if not (local / MANIFEST).exists() or (local / MANIFEST).read_bytes() != manifest:
            shutil.rmtree(local, ignore_errors=True)  # a stale copy (e.g. the name was registered again)
            self.storage.get_dir(key, local)
            (local / MANIFEST).write_bytes(manifest)  # last: marks the local copy complete
        here = entry.model_copy(update={"path": str(local)})
        try:
            if entry.adapter:
                assert entry.base_model is not None
                base = self.registry.get(entry.base_model)
                models_dir = self.models_dir
                loaded = run_on(self.lane, lambda: load_adapter(here, base, local, models_dir))
                return serve(here, self.models_dir, poll_steps=self.poll_steps, loaded=loaded, lane=self.lane)
            return serve(here, self.models_dir, poll_steps=self.poll_steps, lane=self.lane)
        except WorkerFatal as exc:
            # A broken upload fails the jobs that name it, not the worker serving every other model. The
            # cause names local paths: it goes to the log, the job's error only names the model.
            log.error("%s", exc)
            raise ModelNotFound(f"fine-tuned model {name!r} could not be loaded", param="model") from exc
