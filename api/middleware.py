"""Plain ASGI middleware: body size caps enforced before any body is parsed (a 10 MB JSON body gets
413, not a 500) and request metrics.

Both are raw ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` wraps
every request in extra tasks and streams, which cost about a millisecond per request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from api import metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes; ``limit_for`` may raise it per path (uploads)."""

    def __init__(self, app: ASGIApp, limit: int, limit_for: Callable[[str], int | None] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = (self.limit_for(scope["path"]) if self.limit_for else None) or self.limit
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = limit + 1
                if declared > limit:
                    await _too_large(send, limit)
                    return
        seen = 0
        started = refused = False

        async def guarded(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 is out; whatever the app answers to the aborted read is dropped
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def counted() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Answer now: the app may catch the error below (FastAPI turns any failure while
                    # reading a JSON body into a 400), so the 413 must not depend on it propagating.
                    if not started and not refused:
                        await _too_large(send, limit)
                        refused = True
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, guarded)
        except _BodyTooLarge:
            if not started and not refused:
                await _too_large(send, limit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps(
        {
            "error": {
                "code": "payload_too_large",
                "message": f"request body is over {limit} bytes",
                "param": None,
                "type": "payload_too_large",
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Observe:
    """Count requests by route template, method and status, and time them (``api.metrics``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception that escapes the app becomes a 500 further out

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            # The router records the matched route in the scope; label by its template, never the raw path.
            path = getattr(scope.get("route"), "path", "unmatched")
            method = str(scope.get("method", ""))
            metrics.REQUESTS.labels(path, method, str(status)).inc()
            metrics.LATENCY.labels(path, method).observe(time.perf_counter() - started)
