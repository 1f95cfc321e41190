"""Handler lookup through the job-type table: a handler is imported only when a worker serves its type."""

from __future__ import annotations

import importlib

from queueformer.contract.jobs import Task
from queueformer.contract.tasks import spec_of
from workers.handlers.base import Handler


def handler_class(task: Task) -> type[Handler]:
    module, _, name = spec_of(task).handler.partition(":")
    cls: type[Handler] = getattr(importlib.import_module(module), name)
    return cls
