"""The Trainer's window onto the job: progress events, stop requests, checkpoint uploads.

Stop requests (cancel, deadline, worker drain) are checked after every optimizer step, inside the
training loop, so they work in any pool; a stop first saves a checkpoint, so nothing trained is lost.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from queueformer.server.checkpoints import Checkpoints
from queueformer.server.jobs import JobStore

log = logging.getLogger(__name__)


class JobCallback(TrainerCallback):
    """Reports one fine-tune job's progress and uploads its checkpoints."""

    def __init__(
        self,
        job_id: str,
        jobs: JobStore,
        checkpoints: Checkpoints,
        stop_reason: Callable[[], str | None],
        resumed_from_step: int | None,
    ) -> None:
        self.job_id = job_id
        self.jobs = jobs
        self.checkpoints = checkpoints
        self.stop_reason = stop_reason
        self.resumed_from_step = resumed_from_step
        self.stopped: str | None = None
        self.last: dict[str, Any] = {}
        self.saved: list[int] = []

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> TrainerControl:
        reason = self.stop_reason()
        if reason and not self.stopped:
            log.info("job %s stops at step %d: %s", self.job_id, state.global_step, reason)
            self.stopped = reason
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.last["loss"] = round(float(logs["loss"]), 6)
        if "eval_loss" in logs:
            self.last["eval_loss"] = round(float(logs["eval_loss"]), 6)
            self.last["perplexity"] = round(math.exp(min(float(logs["eval_loss"]), 700.0)), 4)
        if "learning_rate" in logs:
            self.last["learning_rate"] = float(logs["learning_rate"])
        self.jobs.set_progress(self.job_id, self.progress(state))

    def progress(self, state: TrainerState) -> dict[str, Any]:
        return {
            "step": state.global_step,
            "max_steps": state.max_steps,
            "epoch": round(float(state.epoch or 0.0), 4),
            "resumed_from_step": self.resumed_from_step,
            **self.last,
        }

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        step = state.global_step
        local = Path(str(args.output_dir)) / f"checkpoint-{step}"
        if step in self.saved or not local.is_dir():
            return
        self.checkpoints.upload(local, step, {**self.last, "saved_at": time.time()})
        self.saved.append(step)
        # Clients read events: the checkpoint's storage location stays internal (its step names it).
        self.jobs.emit(self.job_id, "checkpoint", {"step": step, **self.last})
