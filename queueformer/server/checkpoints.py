"""Resumable checkpoints in storage: ``checkpoints/{job}/step-N``, each a Trainer checkpoint directory.

A checkpoint holds the weights (or the adapter), optimizer, scheduler, RNG states and trainer state
(the global step, from which the Trainer skips the batches already seen). It counts only once its
manifest lands (``Storage.put_dir`` writes it last), so a worker killed mid-upload leaves nothing a
resume could trip on.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from queueformer.server.storage import Storage

log = logging.getLogger(__name__)

_STEP = re.compile(r"step-(\d+)$")


class Checkpoints:
    """The checkpoints of one fine-tune job."""

    def __init__(self, storage: Storage, job_id: str) -> None:
        self.storage = storage
        self.job_id = job_id

    def upload(self, local: Path, step: int, metrics: dict[str, Any]) -> str:
        return self.storage.put_dir(local, self.storage.checkpoint_key(self.job_id, step), {"step": step, **metrics})

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        out = []
        for key in self.storage.list(self.storage.checkpoints_prefix(self.job_id)):
            m = _STEP.search(key)
            if m and self.storage.dir_complete(self.storage.checkpoint_key(self.job_id, int(m.group(1)))):
                out.append(int(m.group(1)))
        return sorted(out)

    def describe(self) -> list[dict[str, Any]]:
        """Each complete checkpoint's manifest (step, metrics, when); where it is stored stays internal."""
        out = []
        for step in self.steps():
            manifest = self.storage.manifest(self.storage.checkpoint_key(self.job_id, step))
            manifest.pop("files", None)
            out.append({**manifest, "step": step})
        return out

    def restore_latest(self, into: Path) -> tuple[int, Path] | None:
        """Download the newest complete checkpoint as ``into/checkpoint-N`` (the Trainer's own layout)."""
        steps = self.steps()
        if not steps:
            return None
        step = steps[-1]
        local = into / f"checkpoint-{step}"
        shutil.rmtree(local, ignore_errors=True)
        self.storage.get_dir(self.storage.checkpoint_key(self.job_id, step), local)
        log.info("job %s resumes from checkpoint step %d", self.job_id, step)
        return step, local
