"""One rooted error hierarchy shared by the API, the workers and the client.

Every error carries a stable ``code`` (what clients branch on), ``retryable`` (whether the system may
run the same work again and expect a different outcome) and the HTTP status the API answers with.
Workers record ``ErrorInfo`` in job records and batch error lines; the API never parses tracebacks.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel


class ErrorInfo(BaseModel):
    """The serialisable face of an error: what job records, error lines and HTTP bodies carry."""

    code: str
    message: str
    retryable: bool = False
    param: str | None = None


class QueueformerError(Exception):
    """Root of every error queueformer raises on purpose."""

    code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, param: str | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details or {}

    def info(self) -> ErrorInfo:
        return ErrorInfo(code=self.code, message=self.message, retryable=self.retryable, param=self.param)


class InternalError(QueueformerError):
    """A bug or an unexpected failure while running a job; it is logged with its traceback."""

    code = "internal_error"


# --- the caller's fault: never retried -------------------------------------------------------------


class InvalidInput(QueueformerError):
    """The job or request is malformed or breaks a configured limit."""

    code = "invalid_input"
    http_status = 422


class InputTooLong(InvalidInput):
    """The input has more tokens than the model accepts and the job did not ask for truncation."""

    code = "input_too_long"


class NoMaskToken(InvalidInput):
    """A fill-mask text contains no mask token."""

    code = "no_mask_token"


class NoChatTemplate(InvalidInput):
    """A chat request went to a model whose tokenizer has no chat template."""

    code = "no_chat_template"


class UnsupportedOnHardware(InvalidInput):
    """The job asks for something this worker's hardware cannot do (e.g. QLoRA without bitsandbytes 4-bit)."""

    code = "unsupported_on_hardware"


class ModelNotFound(QueueformerError):
    """The job names a model that is not in the registry (the registry is an allowlist)."""

    code = "model_not_found"
    http_status = 404


class TaskMismatch(InvalidInput):
    """The named model serves a different task than the job asks for."""

    code = "task_mismatch"


class NotFound(QueueformerError):
    """The object does not exist, or belongs to another tenant (the two are indistinguishable on purpose)."""

    code = "not_found"
    http_status = 404


class Unauthorized(QueueformerError):
    """Missing or unknown API key."""

    code = "invalid_api_key"
    http_status = 401


class Forbidden(QueueformerError):
    """Well-formed, but a policy of the operator refuses it (e.g. a webhook to a private address)."""

    code = "forbidden"
    http_status = 403


class Conflict(QueueformerError):
    """The request conflicts with the object's state (e.g. an idempotency key reused with another body)."""

    code = "conflict"
    http_status = 409


class PayloadTooLarge(QueueformerError):
    """A body, upload or batch is larger than the tenant's limit."""

    code = "payload_too_large"
    http_status = 413


class StorageQuotaExceeded(PayloadTooLarge):
    """Storing an upload would pass the tenant's storage quota; deleting files makes room."""

    code = "storage_quota_exceeded"


class QuotaExceeded(QueueformerError):
    """The tenant has too much work enqueued; it may retry once some of it finishes."""

    code = "quota_exceeded"
    retryable = True
    http_status = 429


# --- the system's state: retried with backoff ------------------------------------------------------


class TransientError(QueueformerError):
    """A dependency was briefly unavailable; the same work may succeed when run again."""

    code = "transient"
    retryable = True
    http_status = 503


class BrokerUnavailable(TransientError):
    """Redis (broker or state store) did not answer."""

    code = "broker_unavailable"


class StorageUnavailable(TransientError):
    """The storage backend did not answer."""

    code = "storage_unavailable"


# --- outcomes of running a job ------------------------------------------------------------------


class OutOfMemory(QueueformerError):
    """The device ran out of memory on this job alone; the worker freed memory and keeps serving."""

    code = "out_of_memory"
    http_status = 507


class Cancelled(QueueformerError):
    """The job or batch was cancelled before this work finished."""

    code = "cancelled"
    http_status = 409


class DeadlineExceeded(QueueformerError):
    """The job ran past its deadline (or its batch's completion window)."""

    code = "deadline_exceeded"
    http_status = 504


class WorkerLost(QueueformerError):
    """The work was redelivered after its worker died too many times; it is quarantined."""

    code = "worker_lost"


class WorkerFatal(QueueformerError):
    """The worker cannot go on (model failed to load, device error): it reports unhealthy and exits."""

    code = "worker_fatal"


def error_from_info(info: ErrorInfo) -> QueueformerError:
    """Rebuild the most specific error class for a recorded ``ErrorInfo`` (used by the client SDK)."""
    for cls in _all_subclasses(QueueformerError):
        if cls.code == info.code:
            return cls(info.message, param=info.param)
    err = QueueformerError(info.message, param=info.param)
    return err


def _all_subclasses(cls: type[QueueformerError]) -> list[type[QueueformerError]]:
    out: list[type[QueueformerError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out
