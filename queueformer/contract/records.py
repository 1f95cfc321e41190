"""What a job looks like from outside: its state, timestamps, progress, error and result shapes."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field

from queueformer.contract.errors import ErrorInfo


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


TERMINAL = frozenset(s.value for s in JobState if s.terminal)


class JobRecord(BaseModel):
    """The public view of one job (``GET /v1/jobs/{id}``)."""

    id: str
    object: Literal["job"] = "job"
    task: str
    model: str
    state: JobState
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: dict[str, Any] = Field(default_factory=dict)
    error: ErrorInfo | None = None
    result_url: str | None = Field(None, description="Where a succeeded job's result is read (an API path).")
    attempts: int = 0
    priority: int = Field(5, description="0 to 9, higher first: the job's own, else its tenant's default.")
    metadata: dict[str, str] = Field(default_factory=dict)
    status_url: str | None = None


class CancelAnswer(JobRecord):
    """What ``POST /v1/jobs/{id}/cancel`` answers: the job, and where its cancel stands."""

    status: Literal["cancelled", "cancelling", "succeeded", "failed"] = Field(
        description="cancelled: stopped (a queued job at once); cancelling: its worker stops it at the next "
        "check, then the job reads cancelled; succeeded or failed: it had finished before the cancel came."
    )


# --- results, one shape per job type ---------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TopLogprob(BaseModel):
    """One likely token at a position, with its log-probability."""

    token_id: int
    token: str
    logprob: float


class TokenLogprob(BaseModel):
    """A token's log-probability under the scores it was chosen from, and the most likely tokens there.

    Generated tokens are scored after every logits processor of the job (temperature, top-k, penalties,
    structured output), exactly the distribution the token was picked from; tokens those processors rule
    out are left out of ``top_logprobs``. Prompt tokens are scored by the model's raw logits; the first
    has no log-probability.
    """

    token_id: int
    token: str
    logprob: float | None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Generation(BaseModel):
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "cancelled"]
    logprobs: list[TokenLogprob] | None = Field(None, description="Per generated token, with logprobs=true.")


class GenerateResult(BaseModel):
    task: Literal["generate"] = "generate"
    model: str
    generations: list[Generation]
    prompt_logprobs: list[TokenLogprob] | None = Field(None, description="Per prompt token, with prompt_logprobs=true.")
    usage: Usage


class MaskCandidate(BaseModel):
    """One candidate for one mask: the fill-mask pipeline's shape."""

    score: float
    token: int
    token_str: str
    sequence: str


class FillMaskResult(BaseModel):
    task: Literal["fill-mask"] = "fill-mask"
    model: str
    masks: list[list[MaskCandidate]] = Field(description="One candidate list per mask token, in text order.")
    usage: Usage


class Translation(BaseModel):
    text: str
    token_ids: list[int]


class TranslateResult(BaseModel):
    task: Literal["translate"] = "translate"
    model: str
    translation: Translation = Field(description="The first (best) translation.")
    translations: list[Translation] = Field(
        default_factory=list, description="Every returned translation (num_return_sequences), best first."
    )
    usage: Usage


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResult(BaseModel):
    task: Literal["classify"] = "classify"
    model: str
    labels: list[list[LabelScore]] = Field(description="Per input text, labels best first.")
    multi_label: bool = False
    usage: Usage


class EmbedResult(BaseModel):
    task: Literal["embed"] = "embed"
    model: str
    embeddings: list[list[float]] = Field(description="One vector per input, in input order.")
    pooling: str
    normalized: bool
    encoding_format: Literal["float", "base64"] = "float"
    usage: Usage


class FineTuneResult(BaseModel):
    task: Literal["fine-tune"] = "fine-tune"
    model: str = Field(description="The base model.")
    fine_tuned_model: str = Field(description="The new servable model name.")
    method: str
    steps: int
    train_loss: float | None = None
    eval_loss: float | None = None
    perplexity: float | None = None
    resumed_from_step: int | None = Field(None, description="The checkpoint step a redelivered run resumed from.")
    trained_tokens: int = 0
    checkpoints: list[int] = Field(default_factory=list, description="Steps checkpointed by the final run.")


class EchoResult(BaseModel):
    task: Literal["echo"] = "echo"
    model: str
    text: str
    usage: Usage = Field(default_factory=Usage)
