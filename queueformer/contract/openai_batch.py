"""The OpenAI Batch API wire format, and how its request bodies map onto queueformer jobs.

Input lines are ``{"custom_id", "method": "POST", "url", "body"}``; output lines are
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``. ``url`` picks
the job type:

* ``/v1/completions`` -> generate, answered with an OpenAI completion object;
* ``/v1/chat/completions`` -> generate over the model's chat template, answered as a chat completion;
* ``/v1/fill-mask``, ``/v1/translations``, ``/v1/classifications`` -> the other job types;
* ``/v1/jobs`` -> any queueformer job body, answered with its native result.

OpenAI semantics hold on OpenAI urls (``temperature`` defaults to 1 and 0 means greedy, ``max_tokens``
defaults to 16); HF parameters (``top_k``, ``repetition_penalty``, ``num_beams``, ``ignore_eos``) are
accepted as extensions, as vLLM does.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import time
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from queueformer.contract.errors import ErrorInfo, QueueformerError
from queueformer.contract.jobs import (
    ClassifyJob,
    EchoJob,
    EmbedInput,
    EmbedJob,
    FillMaskJob,
    GenerateJob,
    JobBase,
    ModelName,
    ResponseFormat,
    TranslateJob,
)
from queueformer.contract.priority import MAX_PRIORITY, MIN_PRIORITY
from queueformer.contract.records import (
    ClassifyResult,
    EchoResult,
    EmbedResult,
    FillMaskResult,
    GenerateResult,
    TokenLogprob,
    TranslateResult,
)
from queueformer.contract.tasks import TASK_NAMES, batch_urls, parse_job, spec_of

ENDPOINTS = batch_urls()


class BatchStatus(StrEnum):
    """OpenAI's eight batch statuses; :mod:`queueformer.server.batches` holds the moves between them."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)

    @property
    def retryable(self) -> bool:
        """A finished batch whose failed lines may run again (a batch that failed validation never ran)."""
        return self in (BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)


CUSTOM_ID_MAX = 512


class BatchLine(BaseModel):
    """One input line (``BatchRequestInput``)."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=CUSTOM_ID_MAX)
    method: Literal["POST"]
    url: str = Field(max_length=64)
    body: dict[str, Any]


# --- request bodies ------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelName
    user: str | None = Field(None, max_length=256)


class _Sampling(_Body):
    """What completions and chat share, with OpenAI's semantics (defaults, ranges, greedy at temperature 0)."""

    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    response_format: ResponseFormat | None = None
    stream: Literal[False] | None = None
    stream_options: dict[str, Any] | None = Field(None, description="Only with stream=true: null in batch lines.")
    # extensions (HF generate parameters)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    num_beams: int | None = Field(None, ge=1)
    ignore_eos: bool = False

    @field_validator("stream_options")
    @classmethod
    def _no_stream_options(cls, value: dict[str, Any] | None) -> None:
        if value is not None:
            raise ValueError("stream_options goes with stream=true, which batch lines cannot use; send null or omit it")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids (digits only); got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are from -100 to 100; token {key} has {bias}")
        return value

    def generate_kwargs(self) -> dict[str, Any]:
        temperature = 1.0 if self.temperature is None else self.temperature
        greedy = temperature == 0
        kwargs: dict[str, Any] = {
            "model": self.model,
            "max_new_tokens": self.max_completion_tokens or self.max_tokens or 16,
            "do_sample": not greedy and (self.num_beams or 1) == 1,
            "num_return_sequences": self.n,
            "stop": [self.stop] if isinstance(self.stop, str) else (self.stop or []),
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
            "top_k": self.top_k if self.top_k is not None else (0 if not greedy else None),
            "repetition_penalty": self.repetition_penalty,
            "num_beams": self.num_beams,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            # OpenAI's logit_bias is transformers' sequence_bias over one-token sequences.
            "sequence_bias": [[[int(k)], v] for k, v in self.logit_bias.items()] if self.logit_bias else None,
            "response_format": self.response_format,
        }
        if not greedy:
            kwargs["temperature"] = temperature
            kwargs["top_p"] = self.top_p
        return kwargs


class CompletionBody(_Sampling):
    prompt: str
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Log-probabilities of the chosen tokens and this many likeliest at each."
    )
    echo: bool = Field(False, description="The prompt comes back before each completion (with its logprobs).")
    suffix: str | None = Field(
        None, description="Text after the completion (insertion): no served model is trained for it, so only empty."
    )
    best_of: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Candidates to pick the n best from; greedy candidates are all the same, so only n (or any value "
        "at temperature 0) is accepted.",
    )

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError(
                "insertion (a non-empty suffix) is not supported: the served models are not trained for it"
            )
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if value is None or value == n or info.data.get("temperature") == 0:
            return value
        if value < n:
            raise ValueError(f"best_of ({value}) must be at least n ({n})")
        raise ValueError(
            f"best_of > n ({value} > {n}) with sampling ranks candidates by log-probability, which this server "
            "does not do; send n and best_of equal, or temperature 0"
        )


class TextPart(BaseModel):
    """A content part of a chat message; served models read text only."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"part {i} has type {kind!r}; the served models read text parts only")
        return value

    @property
    def text(self) -> str:
        """The message's text; parts are joined with newlines (as vLLM joins them)."""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatBody:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self


class FillMaskBody(_Body):
    input: str | None = None
    text: str | None = None
    top_k: int = 5
    targets: str | list[str] | None = None

    @model_validator(mode="after")
    def _one_text(self) -> FillMaskBody:
        if (self.input is None) == (self.text is None):
            raise ValueError("give exactly one of input or text")
        return self


class TranslationBody(_Body):
    """The text in ``input`` (or ``text``); ``max_tokens``/``n`` as OpenAI names them, the rest as generate does."""

    input: str | None = None
    text: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    num_return_sequences: int | None = Field(None, ge=1)
    num_beams: int | None = Field(None, ge=1)
    do_sample: bool | None = None
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    target_language: str | None = None
    forced_bos_token_id: int | None = Field(None, ge=0)
    truncate: bool | None = None

    @model_validator(mode="after")
    def _one_text(self) -> TranslationBody:
        if (self.input is None) == (self.text is None):
            raise ValueError("give exactly one of input or text")
        return self

    def job(self) -> TranslateJob:
        fields = self.model_dump(exclude={"user", "input", "text", "max_tokens", "n"}, exclude_none=True)
        fields["text"] = self.input if self.input is not None else self.text
        if self.max_tokens is not None:
            fields.setdefault("max_new_tokens", self.max_tokens)
        if self.n is not None:
            fields.setdefault("num_return_sequences", self.n)
        return TranslateJob(**fields)


class ClassificationBody(_Body):
    input: str | list[str]
    text_pair: str | list[str] | None = None
    top_k: int | None = 1
    function_to_apply: Literal["default", "softmax", "sigmoid", "none"] = "default"


class EmbeddingsBody(_Body):
    """OpenAI's embeddings request; ``pooling``, ``normalize`` and ``truncate`` are extensions."""

    input: EmbedInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=65_536)
    pooling: Literal["mean", "cls", "last"] = "mean"
    normalize: bool = True
    truncate: bool = False

    def job(self) -> EmbedJob:
        return EmbedJob(**self.model_dump(exclude={"user"}, exclude_none=True))


def _clean(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def job_for(url: str, body: dict[str, Any]) -> JobBase:
    """The queueformer job an input line asks for; raises ``ValidationError`` or ``ValueError``."""
    if url == "/v1/completions":
        c = CompletionBody.model_validate(body)
        scores = {"logprobs": c.logprobs is not None, "top_logprobs": c.logprobs or 0}
        return GenerateJob(
            prompt=c.prompt, prompt_logprobs=c.echo and c.logprobs is not None, **scores, **_clean(c.generate_kwargs())
        )
    if url == "/v1/chat/completions":
        ch = ChatBody.model_validate(body)
        turns = [{"role": m.role, "content": m.text, **({"name": m.name} if m.name else {})} for m in ch.messages]
        scored = {"logprobs": bool(ch.logprobs), "top_logprobs": ch.top_logprobs or 0}
        return GenerateJob(prompt="", messages=turns, **scored, **_clean(ch.generate_kwargs()))
    if url == "/v1/fill-mask":
        f = FillMaskBody.model_validate(body)
        return FillMaskJob(model=f.model, text=f.input or f.text or "", top_k=f.top_k, targets=f.targets)
    if url == "/v1/translations":
        return TranslationBody.model_validate(body).job()
    if url == "/v1/classifications":
        cl = ClassificationBody.model_validate(body)
        return ClassifyJob(
            model=cl.model,
            text=cl.input,
            text_pair=cl.text_pair,
            top_k=cl.top_k,
            function_to_apply=cl.function_to_apply,
        )
    if url == "/v1/embeddings":
        return EmbeddingsBody.model_validate(body).job()
    if url == "/v1/jobs":
        job = parse_job(body)
        if not spec_of(job.task).batch_line:
            raise ValueError(f"{job.task} jobs are not batch lines; see the API reference for their own route")
        return job
    raise ValueError(f"url {url!r} is not supported; supported: {', '.join(ENDPOINTS)}")


def parse_line(raw: bytes | str, endpoint: str) -> tuple[BatchLine, JobBase]:
    """Validate one input line against the batch's endpoint; raises ``LineError``."""
    try:
        data = json.loads(raw)
    except ValueError as exc:  # malformed, not UTF-8, or an integer past Python's 4,300-digit conversion limit
        raise LineError("invalid_json", f"line is not valid JSON: {exc}") from None
    except RecursionError:
        raise LineError("invalid_json", "line is nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise LineError("invalid_request", "line must be a JSON object")
    try:
        line = BatchLine.model_validate(data)
    except ValidationError as exc:
        raise LineError("invalid_request", _first_error(exc), custom_id=_maybe_str(data.get("custom_id"))) from None
    if line.url != endpoint:
        raise LineError(
            "invalid_url", f"url {line.url!r} differs from the batch endpoint {endpoint!r}", line.custom_id, "url"
        )
    try:
        job = job_for(line.url, line.body)
    except ValidationError as exc:
        raise LineError(
            "invalid_request", _first_error(exc, "body"), line.custom_id, _first_param(exc, "body")
        ) from None
    except ValueError as exc:
        raise LineError("invalid_request", str(exc), line.custom_id, "url") from None
    return line, job


class LineError(Exception):
    """A line that cannot run: reported with its line number, never fatal to the batch."""

    def __init__(self, code: str, message: str, custom_id: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.custom_id = custom_id
        self.param = param


def _maybe_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _first_param(exc: ValidationError, prefix: str = "") -> str | None:
    errs = exc.errors()
    if not errs:
        return None
    loc = [str(p) for p in errs[0]["loc"]]
    if len(loc) > 1 and loc[0] in TASK_NAMES:
        loc = loc[1:]  # a discriminated union puts the tag first ("generate", "prompt"); the field is what callers want
    return ".".join([prefix, *loc] if prefix else loc) or None


def _first_error(exc: ValidationError, prefix: str = "") -> str:
    errs = exc.errors()
    param = _first_param(exc, prefix)
    msg = errs[0]["msg"] if errs else str(exc)
    return f"{param}: {msg}" if param else msg


# --- output lines --------------------------------------------------------------------------------


def request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def output_line(custom_id: str, status_code: int, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": request_id(), "body": body},
        "error": None,
    }


def error_line(custom_id: str, error: ErrorInfo, http_status: int | None = None) -> dict[str, Any]:
    """An error-file line: HTTP-level failures keep a response; the rest carry ``error`` only."""
    if http_status is not None and 400 <= http_status < 500:
        body = {"error": {"message": error.message, "type": error.code, "param": error.param, "code": error.code}}
        return output_line(custom_id, http_status, body)
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": error.code, "message": error.message},
    }


def error_line_for(custom_id: str, exc: QueueformerError) -> dict[str, Any]:
    return error_line(custom_id, exc.info(), exc.http_status)


def completion_logprobs(tokens: list[TokenLogprob], prompt: list[TokenLogprob] | None, offset: int) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object; ``prompt`` tokens (echo) come first, the first unscored."""
    every = [*(prompt or []), *tokens]
    offsets, at = [], offset
    for t in every:
        offsets.append(at)
        at += len(t.token)
    return {
        "tokens": [t.token for t in every],
        "token_logprobs": [t.logprob for t in every],
        "top_logprobs": [None if t.logprob is None else {x.token: x.logprob for x in t.top_logprobs} for t in every],
        "text_offset": offsets,
    }


def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """Chat's ``logprobs``: per token its text, log-probability, UTF-8 bytes and the likeliest alternatives."""
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.token.encode("utf-8")),
                "top_logprobs": [
                    {"token": x.token, "logprob": x.logprob, "bytes": list(x.token.encode("utf-8"))}
                    for x in t.top_logprobs
                ],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def response_body(url: str, result: BaseModel, model: str, request: dict[str, Any] | None = None) -> dict[str, Any]:
    """The response body an OpenAI client expects for ``url``, built from a queueformer result.

    ``request`` is the line's body, for what shapes the answer rather than the job (completions' ``echo``).
    """
    created = int(time.time())
    usage = getattr(result, "usage", None)
    prompt_t = usage.prompt_tokens if usage else 0
    completion_t = usage.completion_tokens if usage else 0
    usage_obj = {"prompt_tokens": prompt_t, "completion_tokens": completion_t, "total_tokens": prompt_t + completion_t}
    if url == "/v1/completions" and isinstance(result, GenerateResult):
        echo = str(request.get("prompt", "")) if request and request.get("echo") else ""
        start = 0 if echo else len(str((request or {}).get("prompt", "")))
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "text": echo + g.text,
                    "index": g.index,
                    "logprobs": None
                    if g.logprobs is None
                    else completion_logprobs(g.logprobs, result.prompt_logprobs if echo else None, start),
                    "finish_reason": g.finish_reason,
                }
                for g in result.generations
            ],
            "usage": usage_obj,
        }
    if url == "/v1/chat/completions" and isinstance(result, GenerateResult):
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": g.index,
                    "message": {"role": "assistant", "content": g.text, "refusal": None},
                    "logprobs": None if g.logprobs is None else chat_logprobs(g.logprobs),
                    "finish_reason": g.finish_reason,
                }
                for g in result.generations
            ],
            "usage": usage_obj,
        }
    if url == "/v1/fill-mask" and isinstance(result, FillMaskResult):
        return {
            "object": "fill_mask",
            "created": created,
            "model": model,
            "masks": [[c.model_dump() for c in m] for m in result.masks],
            "usage": usage_obj,
        }
    if url == "/v1/translations" and isinstance(result, TranslateResult):
        return {
            "object": "translation",
            "created": created,
            "model": model,
            "text": result.translation.text,
            "choices": [
                {"index": i, "text": t.text} for i, t in enumerate(result.translations or [result.translation])
            ],
            "usage": usage_obj,
        }
    if url == "/v1/classifications" and isinstance(result, ClassifyResult):
        return {
            "object": "classification",
            "created": created,
            "model": model,
            "data": [
                {"index": i, "labels": [ls.model_dump() for ls in labels]} for i, labels in enumerate(result.labels)
            ],
            "multi_label": result.multi_label,
            "usage": usage_obj,
        }
    if url == "/v1/embeddings" and isinstance(result, EmbedResult):
        return embeddings_list(result, model)
    if isinstance(result, EchoResult | BaseModel):
        return {"object": "job.result", "created": created, **result.model_dump(mode="json")}
    raise TypeError(f"no response shape for {url}")


def embeddings_list(result: EmbedResult, model: str) -> dict[str, Any]:
    """OpenAI's embedding list: floats, or base64 of little-endian float32 when the request asked for it."""

    def encode(vector: list[float]) -> list[float] | str:
        if result.encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.embeddings)],
        "model": model,
        "usage": {"prompt_tokens": result.usage.prompt_tokens, "total_tokens": result.usage.prompt_tokens},
    }


WEBHOOK_URL_MAX = 2048


_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
# What check_webhook_url accepts, as the OpenAPI document states it: http(s), a host without credentials, a port
# from 1 to 65535, then printable ASCII.
_H = "[0-9A-Fa-f]{1,4}"
_V4 = r"((25[0-5]|(2[0-4]|1?[0-9])?[0-9])\.){3}(25[0-5]|(2[0-4]|1?[0-9])?[0-9])"
_V6 = "|".join(
    (
        f"({_H}:){{7}}{_H}",
        f"({_H}:){{1,7}}:",
        f"({_H}:){{1,6}}:{_H}",
        *(f"({_H}:){{1,{5 - k}}}(:{_H}){{1,{k + 2}}}" for k in range(5)),
        f":((:{_H}){{1,7}}|:)",
        f"({_H}:){{6}}{_V4}",
        f"::(ffff(:0{{1,4}})?:)?{_V4}",
        f"({_H}:){{1,4}}:{_V4}",
    )
)
WEBHOOK_URL_PATTERN = (
    r"^[Hh][Tt][Tt][Pp][Ss]?://([A-Za-z0-9._~%!$&'()*+,;=-]+|\[(" + _V6 + r")\])(:" + _PORT + r")?([/?#][!-~]*)?$"
)


def check_webhook_url(url: str) -> None:
    """Refuse a ``webhook_url`` that is not a plain absolute http(s) URL (ValueError naming what is wrong).

    Where it points is checked when the webhook is sent (``queueformer.server.egress``): names resolve
    differently over time, so an address check here would prove nothing.
    """
    if len(url) > WEBHOOK_URL_MAX:
        raise ValueError(f"the URL is longer than {WEBHOOK_URL_MAX} characters")
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError("the URL must be ASCII without spaces or control characters (percent-encode; IDNA hosts)")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("the URL must start with http:// or https://")
    if "@" in parts.netloc:
        raise ValueError("the URL must not carry credentials (user:password@); authenticate with the signature")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    try:
        port = parts.port  # raises on a port out of range or not a number
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ValueError("the URL's port is not a number from 1 to 65535")
    if not re.fullmatch(WEBHOOK_URL_PATTERN, url):
        raise ValueError("the URL's host must be a name, an IPv4 address or a bracketed IPv6 address")


EXPIRES_AFTER_MIN_S = 3600
EXPIRES_AFTER_MAX_S = 30 * 24 * 3600


class ExpiresAfter(BaseModel):
    """OpenAI's expiry policy of a file: ``seconds`` (one hour to 30 days) after the file's ``created_at``."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: int = Field(ge=EXPIRES_AFTER_MIN_S, le=EXPIRES_AFTER_MAX_S)


class BatchCreate(BaseModel):
    """``POST /v1/batches`` body (``BatchCreateParams``) plus the ``webhook_url`` extension."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=128)
    endpoint: Annotated[str, Field(max_length=64, json_schema_extra={"enum": list(ENDPOINTS)})]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16
    )
    output_expires_after: ExpiresAfter | None = Field(
        None, description="Expiry of the batch's output and error files, counted from their creation."
    )
    priority: int | None = Field(
        None,
        ge=MIN_PRIORITY,
        le=MAX_PRIORITY,
        description="Extension: 0 to 9, higher first; every line runs at it. Default: the tenant's default batch "
        "priority, else 2 (below a job's default 5: a batch is background work with a completion window).",
    )
    webhook_url: str | None = Field(
        None,
        max_length=WEBHOOK_URL_MAX,
        json_schema_extra={"pattern": WEBHOOK_URL_PATTERN},
        description="Extension: an http(s) URL POSTed a signed Standard Webhooks event when the batch ends "
        "(batch.completed, batch.failed, batch.expired, batch.cancelled). It must reach a public address unless the "
        "operator allows it (checked when the webhook is sent) and must not carry credentials.",
    )

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_webhook_url(value)
        return value


__all__ = [
    "BatchCreate",
    "BatchLine",
    "BatchStatus",
    "EchoJob",
    "ExpiresAfter",
    "LineError",
    "error_line",
    "job_for",
    "output_line",
    "parse_line",
    "response_body",
]
