"""echo: return the text unchanged. A canary that crosses API, queue, worker and storage, no model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from queueformer.contract.jobs import EchoJob, Task
from queueformer.contract.records import EchoResult
from workers.handlers.base import Handler


class EchoHandler(Handler[EchoJob, str]):
    """No model: measures and checks the pipeline around the model."""

    task = Task.ECHO

    def preprocess(self, job: EchoJob) -> str:
        return job.text

    def forward(self, batch: Sequence[str]) -> list[Any]:
        return list(batch)

    def postprocess(self, item: str, raw: Any) -> EchoResult:
        return EchoResult(model=self.entry.name, text=raw)
