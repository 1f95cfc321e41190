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
        if _declared_length(scope, limit) > limit:
            await _too_large(send, limit)
            return
        guard = _Guard(receive, send, limit)
        try:
            await self.app(scope, guard.receive, guard.send)
        except _BodyTooLarge:
            await guard.refuse()


def _declared_length(scope: Scope, limit: int) -> int:
    """The Content-Length header (an unparsable one counts as over the limit), or 0 when absent."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return limit + 1
    return 0


class _Guard:
    """Counts body bytes as the app reads them and answers 413 the moment they pass the limit."""

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive, self._send, self.limit = receive, send, limit
        self.seen = 0
        self.started = self.refused = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                # Answer now: the app may catch the error below (FastAPI turns any failure while reading
                # a JSON body into a 400), so the 413 must not depend on it propagating.
                await self.refuse()
                raise _BodyTooLarge
        return message

    async def send(self, message: Message) -> None:
        if self.refused:
            return  # the 413 is out; whatever the app answers to the aborted read is dropped
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)

    async def refuse(self) -> None:
        if not self.started and not self.refused:
            self.refused = True
            await _too_large(self._send, self.limit)


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
