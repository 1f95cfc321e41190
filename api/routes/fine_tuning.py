"""``/v1/fine_tuning/jobs``: OpenAI-shaped fine-tuning jobs over queueformer's fine-tune job type.

Requests take OpenAI's fields (``model``, ``training_file``, ``hyperparameters`` with ``n_epochs``,
``batch_size``, ``learning_rate_multiplier``, ``suffix``, ``seed``, ``method``) plus queueformer's:
``method`` may also be ``full``, ``lora`` or ``qlora``, and ``hyperparameters`` takes every knob of
:class:`queueformer.contract.jobs.Hyperparameters` (``max_steps``, ``learning_rate``, ``block_size``,
``checkpoint_steps``, ``eval_split``, LoRA rank...). The job is an ordinary queueformer job: its id
works under ``/v1/jobs`` too.
"""

from __future__ import annotations

import json
import types
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, cast, get_args, get_origin

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from api.deps import ServicesDep, TenantDep
from api.enqueue import Enqueuer
from api.errors import AUTHED, BODY, responses
from api.links import link, links
from api.services import Services
from queueformer.contract.errors import InvalidInput, NotFound
from queueformer.contract.ids import valid_object_id
from queueformer.contract.jobs import FineTuneJob, FineTuneMethod, Hyperparameters, ModelName
from queueformer.contract.records import JobState
from queueformer.server import keys
from queueformer.server.checkpoints import Checkpoints
from queueformer.server.jobs import public_event, record_from_raw
from queueformer.server.overlay import fine_tuned_name

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

DEFAULT_LR = Hyperparameters.model_fields["learning_rate"].default
STATUS = {
    JobState.QUEUED: "queued",
    JobState.RUNNING: "running",
    JobState.SUCCEEDED: "succeeded",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}


def _hyperparameters_model() -> type[BaseModel]:
    """OpenAI's ``hyperparameters`` object: every knob of :class:`Hyperparameters` plus OpenAI's ``n_epochs`` and
    ``learning_rate_multiplier``, each also taking OpenAI's ``"auto"`` (keep queueformer's default).

    Derived from :class:`Hyperparameters`, so the request schema states each knob's type and bounds and a
    wrong value is refused by name before anything is computed from it.
    """
    auto = Literal["auto"]

    def knob(info: FieldInfo) -> Any:
        # A value or "auto"; null is refused (omit the key to keep the default), as the schema then says.
        union = get_origin(info.annotation) in (Union, types.UnionType)
        kinds = [a for a in get_args(info.annotation) if a is not type(None)] if union else [info.annotation]
        value = Annotated[(Union[tuple(kinds)], *info.metadata)]  # type: ignore[valid-type]  # noqa: UP007
        return (value | auto, Field(None, description=info.description))

    fields: dict[str, Any] = {name: knob(info) for name, info in Hyperparameters.model_fields.items()}
    fields["n_epochs"] = knob(Hyperparameters.model_fields["epochs"])
    top = Hyperparameters.model_fields["learning_rate"].metadata  # the multiplier may not take the rate past its cap
    cap = next(m.le for m in top if hasattr(m, "le"))
    multiplier = Annotated[float, Field(ge=1e-6, le=cap / DEFAULT_LR)]  # the rate it gives is a positive float
    fields["learning_rate_multiplier"] = knob(FieldInfo.from_annotation(multiplier))
    model: type[BaseModel] = create_model("FineTuningHyperparameters", __config__=ConfigDict(extra="forbid"), **fields)
    return model


if TYPE_CHECKING:
    FineTuningHyperparameters = BaseModel
else:
    FineTuningHyperparameters = _hyperparameters_model()


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: FineTuningHyperparameters = Field(default_factory=FineTuningHyperparameters)


class OpenAIMethod(BaseModel):
    """OpenAI's ``method`` object; only supervised fine-tuning exists here (trained as LoRA unless told)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod | None = None


class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelName
    training_file: str = Field(
        max_length=1024,
        description="The id of one of your files with purpose fine-tune, or a URI under a prefix the operator "
        "allows (settings: training_data_uris).",
    )
    hyperparameters: FineTuningHyperparameters = Field(default_factory=FineTuningHyperparameters)
    method: FineTuneMethod | OpenAIMethod | None = None
    suffix: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    validation_file: None = Field(
        None, description="Not supported: hyperparameters.eval_split holds out part of the training data."
    )
    metadata: dict[str, Annotated[str, Field(max_length=512)]] = Field(default_factory=dict, max_length=16)
    timeout_s: int | None = Field(None, ge=1, le=7 * 24 * 3600, description="Seconds after which the job fails.")

    def to_job(self) -> FineTuneJob:
        raw = self.hyperparameters.model_dump(exclude_none=True)
        if isinstance(self.method, OpenAIMethod) and self.method.supervised:
            raw.update(self.method.supervised.hyperparameters.model_dump(exclude_none=True))
        hp: dict[str, Any] = {}
        named: dict[str, str] = {}  # queueformer knob -> the name the caller used, for error messages
        for key, value in raw.items():
            if value == "auto":
                continue  # OpenAI's "auto": keep queueformer's default
            if key == "n_epochs":
                hp["epochs"], named["epochs"] = value, key
            elif key == "learning_rate_multiplier":
                hp["learning_rate"], named["learning_rate"] = DEFAULT_LR * value, key
            else:
                hp[key] = value
        if self.seed is not None:
            hp["seed"] = self.seed
        try:
            hyperparameters = Hyperparameters.model_validate(hp)
        except ValidationError as exc:  # both names of one knob, or a configured limit
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else ""
            param = f"hyperparameters.{named.get(field, field)}".rstrip(".")
            raise InvalidInput(f"{param}: {first['msg']}", param=param) from None
        method = self.method if isinstance(self.method, FineTuneMethod) else FineTuneMethod.LORA
        return FineTuneJob(
            model=self.model,
            training_file=self.training_file,
            method=method,
            hyperparameters=hyperparameters,
            suffix=self.suffix,
            metadata=self.metadata,
            timeout_s=self.timeout_s,
        )


def checkpoint_name(spec: FineTuneJob, job_id: str, step: int) -> str:
    """OpenAI's checkpoint name shape (``ft:…:ckpt-step-N``): an id, never the storage location."""
    return f"{fine_tuned_name(spec.model, spec.suffix, job_id)}:ckpt-step-{step}"


def _training_file(services: Services, ref: str) -> str:
    """The training file as the client named it; jobs recorded by older versions kept a storage URI."""
    legacy = services.storage.url + "/files/"
    return ref.removeprefix(legacy) if ref.startswith(legacy) else ref


def _load(services: Services, job_id: str, tenant: str) -> dict[str, str]:
    data = services.jobs.raw(job_id) if valid_object_id(job_id) else {}
    if data.get("tenant") != tenant or data.get("task") != "fine-tune":
        raise NotFound(f"fine-tuning job {job_id!r} not found", param="fine_tuning_job_id")
    return data


def _object(services: Services, data: dict[str, str]) -> dict[str, Any]:
    record = record_from_raw(data)
    spec = FineTuneJob.model_validate_json(data["spec"])
    hp = spec.hyperparameters
    done = record.state == JobState.SUCCEEDED
    return {
        "id": record.id,
        "object": "fine_tuning.job",
        "created_at": int(record.created_at),
        "finished_at": int(record.finished_at) if record.finished_at else None,
        "model": spec.model,
        "fine_tuned_model": record.progress.get("fine_tuned_model") if done else None,
        "organization_id": data.get("tenant"),
        "result_files": [],
        "status": STATUS[record.state],
        "trained_tokens": record.progress.get("trained_tokens") if done else None,
        "training_file": _training_file(services, spec.training_file),
        "validation_file": None,
        "hyperparameters": {
            "n_epochs": hp.epochs if hp.epochs is not None else ("auto" if hp.max_steps is None else None),
            "batch_size": hp.batch_size,
            "learning_rate_multiplier": hp.learning_rate / DEFAULT_LR,
            **hp.model_dump(exclude_none=True),
        },
        "method": {"type": "supervised", "training": spec.method.value},
        "seed": hp.seed,
        "suffix": spec.suffix,
        "user_provided_suffix": spec.suffix,
        "error": record.error.model_dump(include={"code", "message", "param"}) if record.error else None,
        "estimated_finish": None,
        "integrations": [],
        "metadata": spec.metadata,
        "progress": record.progress,
        "attempts": record.attempts,
        "planned_model_name": fine_tuned_name(spec.model, spec.suffix, record.id),
    }


@router.post(
    "",
    openapi_extra=links(
        200,
        RetrieveFineTune=link("/v1/fine_tuning/jobs/{fine_tuning_job_id}", "get", "fine_tuning_job_id"),
        CancelFineTune=link("/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel", "post", "fine_tuning_job_id"),
        FineTuneEvents=link("/v1/fine_tuning/jobs/{fine_tuning_job_id}/events", "get", "fine_tuning_job_id"),
        FineTuneCheckpoints=link("/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints", "get", "fine_tuning_job_id"),
    ),
    responses=responses(*AUTHED, *BODY, 404, 429),
    summary="Create a fine-tuning job (OpenAI-compatible)",
)
def create(body: FineTuningJobCreate, services: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    job_id = Enqueuer(services).submit([body.to_job()], tenant)[0]
    return _object(services, services.jobs.raw(job_id))


@router.get("", responses=responses(*AUTHED, 404, 422), summary="List this tenant's fine-tuning jobs, newest first")
def list_jobs(
    services: ServicesDep,
    tenant: TenantDep,
    after: Annotated[str | None, Query(max_length=80, description="Id of the last job of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    before = record_from_raw(_load(services, after, tenant)).created_at if after else None
    rows = services.jobs.recent_raw(tenant, limit + 1, before, index="fine-tunes")
    return {"object": "list", "data": [_object(services, d) for d in rows[:limit]], "has_more": len(rows) > limit}


@router.get("/{fine_tuning_job_id}", responses=responses(*AUTHED, 404, 422), summary="Retrieve a fine-tuning job")
def retrieve(fine_tuning_job_id: str, services: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    return _object(services, _load(services, fine_tuning_job_id, tenant))


@router.post(
    "/{fine_tuning_job_id}/cancel",
    responses=responses(*AUTHED, 404, 422),
    summary="Cancel: a running job stops at its next step and keeps its last checkpoint",
)
def cancel(fine_tuning_job_id: str, services: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    _load(services, fine_tuning_job_id, tenant)
    services.jobs.request_cancel(fine_tuning_job_id)
    return _object(services, services.jobs.raw(fine_tuning_job_id))


@router.get(
    "/{fine_tuning_job_id}/events",
    responses=responses(*AUTHED, 404, 422),
    summary="Status and training-metric events, newest first",
)
def events(
    fine_tuning_job_id: str,
    services: ServicesDep,
    tenant: TenantDep,
    # 19 digits at most: a stream id is two 64-bit numbers, and Redis refuses larger ones
    after: Annotated[
        str | None, Query(pattern=r"^ftevent-\d{1,19}-\d{1,19}$", description="Id of the last event seen")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict[str, Any]:
    _load(services, fine_tuning_job_id, tenant)
    top = f"({after.removeprefix('ftevent-')}" if after else "+"
    raw = cast(
        list[tuple[str, dict[str, str]]],
        services.redis.xrevrange(keys.events(fine_tuning_job_id), max=top, min="-", count=limit + 1),
    )
    data = [_event(fine_tuning_job_id, eid, fields) for eid, fields in raw[:limit]]
    return {"object": "list", "data": data, "has_more": len(raw) > limit}


def _event(job_id: str, eid: str, fields: dict[str, str]) -> dict[str, Any]:
    kind = fields.get("type", "message")
    data: dict[str, Any] = public_event(job_id, json.loads(fields.get("data") or "{}"))
    level = "error" if data.get("state") == "failed" else "info"
    return {
        "object": "fine_tuning.job.event",
        "id": f"ftevent-{eid}",
        "created_at": int(float(fields.get("at", "0"))),
        "level": level,
        "message": _message(kind, data),
        "data": data,
        "type": "metrics" if kind == "progress" else "message",
    }


def _message(kind: str, data: dict[str, Any]) -> str:
    if kind == "state":
        extra = f" (attempt {data['attempt']})" if "attempt" in data else ""
        err = f": {data['error']['message']}" if isinstance(data.get("error"), dict) else ""
        return f"Job is {data.get('state')}{extra}{err}"
    if kind == "progress":
        loss = f", training loss={data['loss']}" if "loss" in data else ""
        ev = f", eval loss={data['eval_loss']}, perplexity={data.get('perplexity')}" if "eval_loss" in data else ""
        return f"Step {data.get('step')}/{data.get('max_steps')}{loss}{ev}"
    if kind == "checkpoint":
        return f"Checkpoint saved at step {data.get('step')}"
    if kind == "resumed":
        return f"Resumed from the checkpoint at step {data.get('step')}"
    if kind == "cancel_requested":
        return "Cancellation requested"
    return kind


@router.get(
    "/{fine_tuning_job_id}/checkpoints",
    responses=responses(*AUTHED, 404, 422),
    summary="The job's saved checkpoints, newest first",
)
def checkpoints(fine_tuning_job_id: str, services: ServicesDep, tenant: TenantDep) -> dict[str, Any]:
    data = _load(services, fine_tuning_job_id, tenant)
    spec = FineTuneJob.model_validate_json(data["spec"])
    rows = Checkpoints(services.storage, fine_tuning_job_id).describe()
    out = [
        {
            "object": "fine_tuning.job.checkpoint",
            "id": f"ftckpt-{fine_tuning_job_id.split('-', 1)[1]}-{row['step']}",
            "created_at": int(row.get("saved_at", 0)),
            "fine_tuned_model_checkpoint": checkpoint_name(spec, fine_tuning_job_id, row["step"]),
            "step_number": row["step"],
            "metrics": {
                "step": row["step"],
                "train_loss": row.get("loss"),
                "valid_loss": row.get("eval_loss"),
                "perplexity": row.get("perplexity"),
            },
            "fine_tuning_job_id": data["id"],
        }
        for row in reversed(rows)
    ]
    return {"object": "list", "data": out, "has_more": False, "first_id": out[0]["id"] if out else None}
