"""Every error leaves the API in one shape: ``{"error": {"code", "message", "param", "type"}}``.

It is the shape OpenAI clients parse. Validation errors (422) also keep FastAPI's ``detail`` list so
each failing field is named with its location.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from queueformer.errors import BrokerUnavailable, QueueformerError

log = logging.getLogger(__name__)


def error_body(code: str, message: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param, "type": code, **extra}}


def _loc_param(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    # discriminated unions put the tag first ("generate", "prompt"); the field is what callers want
    return ".".join(parts[1:] if len(parts) > 1 and parts[0] in _TASK_TAGS else parts)


_TASK_TAGS = {"generate", "fill-mask", "translate", "classify", "fine-tune", "echo"}


def validation_response(errors: Sequence[Any]) -> JSONResponse:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _loc_param(tuple(first.get("loc", ())))
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors]
    return JSONResponse(
        status_code=422, content={**error_body("invalid_input", message, param or None), "detail": detail}
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(QueueformerError)
    async def _qf(_request: Request, exc: QueueformerError) -> JSONResponse:
        return JSONResponse(
            status_code=exc.http_status, content=error_body(exc.code, exc.message, exc.param, **exc.details)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(exc.errors())

    @app.exception_handler(ValidationError)
    async def _pydantic(_request: Request, exc: ValidationError) -> JSONResponse:
        return validation_response(exc.errors())

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis(_request: Request, exc: Exception) -> JSONResponse:
        err = BrokerUnavailable(f"the queue is unavailable: {exc}")
        return JSONResponse(
            status_code=err.http_status, content=error_body(err.code, err.message), headers={"Retry-After": "5"}
        )
