"""Handler lookup: one entry per job type, imported only when a worker serves that type."""

from __future__ import annotations

import importlib

from queueformer.contract.jobs import Task
from workers.handlers.base import Handler

HANDLERS: dict[Task, str] = {
    Task.GENERATE: "workers.handlers.generate:GenerateHandler",
    Task.FILL_MASK: "workers.handlers.fill_mask:FillMaskHandler",
    Task.TRANSLATE: "workers.handlers.translate:TranslateHandler",
    Task.CLASSIFY: "workers.handlers.classify:ClassifyHandler",
    Task.ECHO: "workers.handlers.echo:EchoHandler",
}


def handler_class(task: Task) -> type[Handler]:
    module, _, name = HANDLERS[task].partition(":")
    cls: type[Handler] = getattr(importlib.import_module(module), name)
    return cls
