"""A worker's own HTTP endpoints: liveness, readiness and Prometheus metrics.

``/readyz`` turns 200 only after every model of the worker is loaded and it consumes; ``/healthz``
turns 503 when an engine hit a fatal error, so Kubernetes restarts the pod instead of feeding it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from workers import metrics

log = logging.getLogger(__name__)


class Health:
    """Liveness and readiness flags, plus the server that exposes them."""

    def __init__(self, alive: Callable[[], bool]) -> None:
        self.ready = False
        self._alive = alive
        self._server: ThreadingHTTPServer | None = None

    @property
    def alive(self) -> bool:
        return self._alive()

    def serve(self, host: str, port: int) -> int:
        health = self

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    self._reply(200 if health.alive else 503, b"ok" if health.alive else b"engine failed")
                elif self.path == "/readyz":
                    ok = health.ready and health.alive
                    self._reply(200 if ok else 503, b"ready" if ok else b"not ready")
                elif self.path == "/metrics":
                    metrics.refresh_device_memory()
                    self._reply(200, generate_latest(metrics.REGISTRY), CONTENT_TYPE_LATEST)
                else:
                    self._reply(404, b"not found")

            def _reply(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer((host, port), _Handler)
        threading.Thread(target=self._server.serve_forever, name="health", daemon=True).start()
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
