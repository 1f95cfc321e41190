"""The job types: one declaration each, from which every list in the code base is derived.

A :class:`TaskSpec` names everything a job type is made of: its job and result models (their fields,
bounds and token estimate live on the models), the worker-side handler and the ``transformers`` auto
class that loads its model (both as strings, so the contract imports neither torch nor the workers),
the native OpenAI-batch url its lines may use, the field plain bulk lines put their text in, and the
tiny offline model that tests and the demo serve it with. The job-body union the API validates, the
handler lookup, the model loading class, quota estimates, batch urls and the bulk-line mapping all
read this table; ``tests/unit/test_tasks.py`` fails for a task declared incompletely.

Adding a job type: a job model and a result model (``jobs.py``, ``records.py``), a ``Task`` member
and one entry here, a handler in ``workers/handlers/``, and a tiny-model builder in
``workers/tiny_models.py`` with its entry in ``registries/tiny.yaml``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import BaseModel, Field, TypeAdapter

from queueformer.contract import records
from queueformer.contract.jobs import (
    ClassifyJob,
    EchoJob,
    EmbedJob,
    FillMaskJob,
    FineTuneJob,
    GenerateJob,
    JobBase,
    Task,
    TranslateJob,
)


@dataclass(frozen=True)
class TaskSpec:
    """Everything one job type is made of."""

    task: Task
    job: type[JobBase]
    result: type[BaseModel]
    handler: str  # "module:Class" of the worker-side handler, imported only by workers
    auto_class: str | None  # transformers' AutoModel class that loads its models; None: no model (echo)
    tiny_model: str  # the served name, in the bundled tiny registry, that tests and the demo run it on
    text_field: str | None = None  # where a plain bulk line's "input" goes; None: not a bulk-line task
    openai_url: str | None = None  # the native batch url answering with this task's response shape
    batch_line: bool = True  # whether it may be a batch line (a fine-tune is hours of work: no)


TASKS: Mapping[Task, TaskSpec] = {
    spec.task: spec
    for spec in (
        TaskSpec(
            Task.GENERATE,
            GenerateJob,
            records.GenerateResult,
            handler="workers.handlers.generate:GenerateHandler",
            auto_class="AutoModelForCausalLM",
            tiny_model="tiny-gpt2",
            text_field="prompt",
            openai_url="/v1/completions",
        ),
        TaskSpec(
            Task.FILL_MASK,
            FillMaskJob,
            records.FillMaskResult,
            handler="workers.handlers.fill_mask:FillMaskHandler",
            auto_class="AutoModelForMaskedLM",
            tiny_model="tiny-bert",
            text_field="text",
            openai_url="/v1/fill-mask",
        ),
        TaskSpec(
            Task.TRANSLATE,
            TranslateJob,
            records.TranslateResult,
            handler="workers.handlers.translate:TranslateHandler",
            auto_class="AutoModelForSeq2SeqLM",
            tiny_model="tiny-marian-en-de",
            text_field="text",
            openai_url="/v1/translations",
        ),
        TaskSpec(
            Task.CLASSIFY,
            ClassifyJob,
            records.ClassifyResult,
            handler="workers.handlers.classify:ClassifyHandler",
            auto_class="AutoModelForSequenceClassification",
            tiny_model="tiny-sentiment",
            text_field="text",
            openai_url="/v1/classifications",
        ),
        TaskSpec(
            Task.EMBED,
            EmbedJob,
            records.EmbedResult,
            handler="workers.handlers.embed:EmbedHandler",
            auto_class="AutoModel",
            tiny_model="tiny-bert-embed",
            text_field="input",
            openai_url="/v1/embeddings",
        ),
        TaskSpec(
            Task.FINE_TUNE,
            FineTuneJob,
            records.FineTuneResult,
            handler="workers.handlers.fine_tune:FineTuneHandler",
            auto_class="AutoModelForCausalLM",
            tiny_model="tiny-gpt2",
            batch_line=False,
        ),
        TaskSpec(
            Task.ECHO,
            EchoJob,
            records.EchoResult,
            handler="workers.handlers.echo:EchoHandler",
            auto_class=None,
            tiny_model="echo",
            text_field="text",
        ),
    )
}

TASK_NAMES = frozenset(t.value for t in TASKS)

if TYPE_CHECKING:
    AnyJob = JobBase
    JobSpec = JobBase
else:
    AnyJob = JobBase
    # The request body of any job: the union of every declared job model, discriminated on ``task``.
    JobSpec = Annotated[Union[tuple(spec.job for spec in TASKS.values())], Field(discriminator="task")]  # noqa: UP007

JOB_ADAPTER: TypeAdapter[Any] = TypeAdapter(JobSpec)


def spec_of(task: Task | str) -> TaskSpec:
    return TASKS[Task(task)]


def parse_job(data: Any) -> JobBase:
    """Validate a job body (dict or JSON text); raises pydantic's ``ValidationError`` naming the field."""
    job: JobBase = (
        JOB_ADAPTER.validate_json(data) if isinstance(data, str | bytes) else JOB_ADAPTER.validate_python(data)
    )
    return job


def estimate_tokens(job: JobBase) -> int:
    """The job's quota estimate, as its model declares it."""
    return job.estimated_tokens()


def batch_urls() -> tuple[str, ...]:
    """Every url a batch line may use: OpenAI's completions and chat, each task's native url, and /v1/jobs."""
    native = [s.openai_url for s in TASKS.values() if s.openai_url and s.openai_url != "/v1/completions"]
    return ("/v1/completions", "/v1/chat/completions", *native, "/v1/jobs")
