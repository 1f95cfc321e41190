"""Every job type is declared completely, once, in ``queueformer.contract.tasks``."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import pytest
import transformers

from queueformer.contract.jobs import JobBase, Task
from queueformer.contract.openai_batch import ENDPOINTS
from queueformer.contract.registry import Registry
from queueformer.contract.tasks import TASKS, JobSpec, TaskSpec, parse_job
from workers.tiny_models import BUILDERS


def _default(model: type[Any], field: str) -> Any:
    info = model.model_fields.get(field)
    return None if info is None else info.default


def problems(spec: TaskSpec) -> list[str]:
    """What is missing or inconsistent in one declaration."""
    out = []
    if _default(spec.job, "task") != spec.task.value:
        out.append(f"{spec.job.__name__}.task is not {spec.task.value!r}")
    if _default(spec.result, "task") != spec.task.value:
        out.append(f"{spec.result.__name__}.task is not {spec.task.value!r}")
    if spec.job.estimated_tokens is JobBase.estimated_tokens:
        out.append(f"{spec.job.__name__} declares no token estimate")
    module, sep, name = spec.handler.partition(":")
    handler = getattr(importlib.import_module(module), name, None) if sep else None
    if handler is None or getattr(handler, "task", None) != spec.task:
        out.append(f"handler {spec.handler!r} is not a class serving {spec.task.value!r}")
    entry = Registry.load("tiny").get(spec.tiny_model, spec.task) if spec.tiny_model in Registry.load("tiny") else None
    if entry is None:
        out.append(f"tiny model {spec.tiny_model!r} is not in the tiny registry")
    elif (entry.path is None) != (spec.auto_class is None):
        out.append(f"tiny model {spec.tiny_model!r} and auto class {spec.auto_class!r} disagree about weights")
    elif entry.path is not None and entry.path not in BUILDERS:
        out.append(f"tiny model {spec.tiny_model!r} has no builder in workers.tiny_models")
    if spec.auto_class is not None and not hasattr(transformers, spec.auto_class):
        out.append(f"transformers has no {spec.auto_class}")
    if spec.text_field is not None and spec.text_field not in spec.job.model_fields:
        out.append(f"{spec.job.__name__} has no field {spec.text_field!r}")
    if spec.openai_url is not None and spec.openai_url not in ENDPOINTS:
        out.append(f"{spec.openai_url} is not a batch url")
    return out


@pytest.mark.parametrize("task", list(Task), ids=[t.value for t in Task])
def test_every_task_is_declared_completely(task: Task) -> None:
    assert task in TASKS, f"{task.value} has no TaskSpec"
    assert TASKS[task].task == task
    assert problems(TASKS[task]) == []


def test_an_incomplete_declaration_is_caught() -> None:
    broken = dataclasses.replace(
        TASKS[Task.CLASSIFY], handler="workers.handlers.classify:Nope", tiny_model="tiny-gone", text_field="prompt"
    )
    assert len(problems(broken)) == 3


def test_the_job_union_and_urls_come_from_the_table() -> None:
    union = JobSpec.__origin__ if hasattr(JobSpec, "__origin__") else JobSpec
    members = {m.__name__ for m in union.__args__}  # type: ignore[union-attr]
    assert members == {spec.job.__name__ for spec in TASKS.values()}
    urls = [spec.openai_url for spec in TASKS.values() if spec.openai_url]
    assert len(urls) == len(set(urls)) and set(urls) <= set(ENDPOINTS)
    for spec in TASKS.values():
        assert type(parse_job({"task": spec.task.value, "model": "m", **_minimal(spec.task)})) is spec.job


def _minimal(task: Task) -> dict[str, Any]:
    return {
        Task.TRANSLATE: {"text": "x"},
        Task.FILL_MASK: {"text": "x [MASK]"},
        Task.CLASSIFY: {"text": "x"},
        Task.EMBED: {"input": "x"},
        Task.FINE_TUNE: {"training_file": "file-0123456789abcdef"},
    }.get(task, {})
