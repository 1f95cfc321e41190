"""Broker messages: the small versioned envelopes that name work, never carry it.

A message names jobs (their inputs live in job records) or a byte range of a batch's input file;
results go to storage. So a message stays small whatever the work, and nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from queueformer.contract.jobs import Task
from queueformer.contract.priority import DEFAULT_BATCH_PRIORITY, DEFAULT_JOB_PRIORITY, Priority

RUN_TASK = "queueformer.run"
ENVELOPE_VERSION = 1


class JobsUnit(BaseModel):
    """Single jobs submitted through ``/v1/jobs``, grouped per model so one message feeds one engine."""

    model_config = ConfigDict(extra="forbid")

    v: int = ENVELOPE_VERSION
    kind: Literal["jobs"] = "jobs"
    model: str
    ids: list[str] = Field(min_length=1, max_length=10_000)
    task: str | None = Field(None, description="Set for fine-tunes, which run on the training path, not an engine.")
    priority: Priority = DEFAULT_JOB_PRIORITY


class LinesUnit(BaseModel):
    """A chunk of batch lines: bytes ``[start, end)`` of the batch's input file, first line number ``first``."""

    model_config = ConfigDict(extra="forbid")

    v: int = ENVELOPE_VERSION
    kind: Literal["lines"] = "lines"
    model: str
    batch: str
    chunk: int = Field(ge=0)
    first: int = Field(ge=0)
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    only: list[int] | None = Field(None, description="Process only these line indices of the range (retries).")
    priority: Priority = DEFAULT_BATCH_PRIORITY


def job_units(
    groups: Mapping[tuple[str, str, str, int], list[str]], per_message: int
) -> Iterator[tuple[JobsUnit, str]]:
    """Messages for job ids grouped by (model, queue, task, priority), with their queues: ``per_message`` ids each.

    A fine-tune is hours of work: one per message, so each is redelivered on its own.
    """
    for (model, queue, task, priority), ids in groups.items():
        fine_tune = task == Task.FINE_TUNE
        step = 1 if fine_tune else per_message
        for start in range(0, len(ids), step):
            chunk = ids[start : start + step]
            yield JobsUnit(model=model, ids=chunk, task=task if fine_tune else None, priority=priority), queue


WorkUnit = Annotated[JobsUnit | LinesUnit, Field(discriminator="kind")]
