"""Every error leaves the API in one shape: ``{"error": {"code", "message", "param", "type"}}``.

It is the shape OpenAI clients parse. Validation errors (422) also keep FastAPI's ``detail`` list so
each failing field is named with its location. A JSON body that cannot be parsed (malformed, not
UTF-8, or nested deeper than the parser goes) is a 400 ``invalid_json``, a form that cannot be parsed a
400 ``invalid_request``; Starlette's own HTTP errors (404 for an unknown path, 405 for a wrong method)
get the same shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from queueformer.contract.errors import BrokerUnavailable, QueueformerError
from queueformer.contract.tasks import TASK_NAMES

log = logging.getLogger(__name__)


def error_body(code: str, message: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param, "type": code, **extra}}


def _loc_param(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # a union names the member that failed after the field ("constrained-float", "literal['auto']")
    parts = parts[:1] + [p for p in parts[1:] if not _is_union_member(p)]
    # discriminated unions put the tag first ("generate", "prompt"); the field is what callers want
    return ".".join(parts[1:] if len(parts) > 1 and parts[0] in _TASK_TAGS else parts)


_TASK_TAGS = TASK_NAMES
_MEMBER_TYPES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_union_member(part: str) -> bool:
    return part in _MEMBER_TYPES or any(c in part for c in "[]()'-,")


_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None
    type: str


class ErrorBody(BaseModel):
    """Every refusal; 422s from validation also carry FastAPI's ``detail`` list naming each failing field."""

    error: ErrorDetail
    detail: list[dict[str, Any]] | None = None


_WHEN = {
    400: "The body is not JSON (or not a form) that parses",
    401: "Missing or unknown API key (with auth required)",
    403: "A policy of the operator refuses it (a webhook to a non-public address)",
    404: "No such object for this tenant, or no such model",
    409: "The object is not in a state that allows this",
    413: "The body or upload is over its size limit, or the tenant's storage quota is spent",
    422: "A field is invalid; `error.param` names it",
    429: "A quota of the tenant is spent; Retry-After says when to try again",
    503: "The queue (Redis) or storage is unavailable; retry",
    504: "The job did not finish in time",
    507: "The device ran out of memory on this request",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the refusals an operation really answers with, all in the one error shape."""
    return {code: {"model": ErrorBody, "description": _WHEN[code]} for code in codes}


AUTHED = (401, 503)  # every operation that names the tenant: its key, and the queue it reads
BODY = (400, 413, 422)  # every operation that reads a body


def invalid_json(message: str) -> JSONResponse:
    return JSONResponse(status_code=400, content=error_body("invalid_json", message))


def _unparsable_body(cause: BaseException) -> JSONResponse:
    """Why FastAPI could not read the body (it raises a bare 400 from the original error)."""
    if isinstance(cause, UnicodeDecodeError):
        return invalid_json(
            f"the request body is not valid JSON text ({cause.encoding}: {cause.reason} at byte {cause.start})"
        )
    if isinstance(cause, RecursionError):
        return invalid_json("the request body is nested too deeply to parse")
    message = f"the request body could not be parsed: {type(cause).__name__}: {cause}"[:300]
    return JSONResponse(status_code=400, content=error_body("invalid_request", message))


def validation_response(errors: Sequence[Any]) -> JSONResponse:
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        loc = tuple(bad_json.get("loc", ()))
        where = f" at position {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        reason = (bad_json.get("ctx") or {}).get("error") or bad_json.get("msg")
        return invalid_json(f"the request body is not valid JSON: {reason}{where}")
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _loc_param(tuple(first.get("loc", ())))
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors]
    return JSONResponse(
        status_code=422, content={**error_body("invalid_input", message, param or None), "detail": detail}
    )


def _allowed(request: Request) -> str:
    """Every method some route serves at this path (Starlette's 405 names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def install(app: FastAPI) -> None:
    @app.exception_handler(QueueformerError)
    async def _qf(_request: Request, exc: QueueformerError) -> JSONResponse:
        return JSONResponse(
            status_code=exc.http_status, content=error_body(exc.code, exc.message, exc.param, **exc.details)
        )

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            return _unparsable_body(exc.__cause__)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed(request)
        return JSONResponse(status_code=exc.status_code, content=error_body(code, str(exc.detail)), headers=headers)

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
