"""A whole cluster on one machine: Redis (embedded when none is configured), API, workers, Flower.

``queueformer up`` runs it in the foreground until Ctrl-C; tests and the demo start and stop it
around their work. Children are separate processes that read the same settings through the
environment, exactly as they would in separate containers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from queueformer.contract.registry import Registry
from queueformer.contract.settings import Settings
from queueformer.server.connection import connect
from queueformer.server.embedded import EmbeddedRedis
from queueformer.server.fleet import Fleet

log = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Cluster:
    """Start, watch and stop the processes of a single-machine cluster."""

    settings: Settings
    api_port: int = 8000
    flower_port: int | None = None
    worker_groups: list[list[str]] | None = None  # queues per worker process; default: one process for all
    worker_concurrency: int | None = None
    worker_health_ports: list[int] | None = None  # one per worker group, for /metrics in tests and probes
    env: dict[str, str] = field(default_factory=dict)
    redis: EmbeddedRedis | None = None
    redis_url: str = ""
    children: list[Child] = field(default_factory=list)
    flower_auth: str | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def log_dir(self) -> Path:
        path = (self.settings.data_dir / "logs").resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def child_env(self, redis_url: str) -> dict[str, str]:
        s = self.settings
        env = {
            **os.environ,
            "QUEUEFORMER_REDIS_URL": redis_url,
            "QUEUEFORMER_DATA_DIR": str(s.data_dir.resolve()),
            "QUEUEFORMER_STORAGE_URL": s.resolved_storage_url,
            "QUEUEFORMER_REGISTRY": s.registry if s.registry in ("tiny", "hub") else str(Path(s.registry).resolve()),
            "QUEUEFORMER_MODELS_DIR": str(s.resolved_models_dir),
            "QUEUEFORMER_VISIBILITY_TIMEOUT_S": str(s.visibility_timeout_s),
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        return env

    def start(self) -> None:
        url = self.settings.redis_url.get_secret_value() if self.settings.redis_url else None
        if url is None:
            self.redis = EmbeddedRedis(self.settings.data_dir / "valkey")
            url = self.redis.start()
        self.redis_url = url
        env = self.child_env(url)
        registry = Registry.load(self.settings.registry)
        groups = self.worker_groups if self.worker_groups is not None else [sorted(registry.queues())]
        for i, queues in enumerate(groups):
            cmd = [sys.executable, "-m", "workers.main", "--queues", *queues]
            if self.worker_concurrency:
                cmd += ["--concurrency", str(self.worker_concurrency)]
            if self.worker_health_ports:
                cmd += ["--health-port", str(self.worker_health_ports[i])]
            self._spawn(f"worker-{i}", cmd, env)
        self._spawn(
            "api",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.api_port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env,
        )
        if self.flower_port:
            self.flower_auth = self.flower_auth or f"admin:{secrets.token_urlsafe(12)}"
            # Celery reads its broker from CELERY_BROKER_URL: the URL (and its password) stays off the
            # command line, where any local user could read it.
            flower_env = {**env, "FLOWER_BASIC_AUTH": self.flower_auth, "CELERY_BROKER_URL": url}
            self._spawn(
                "flower",
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "flower",
                    f"--port={self.flower_port}",
                    "--address=127.0.0.1",
                ],
                flower_env,
            )

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log_path = self.log_dir / f"{name}.log"
        self.children.append(Child(name, self._popen(cmd, env, log_path), log_path, cmd, env))

    @staticmethod
    def _popen(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as out:  # the child keeps its own copy of the descriptor
            # start_new_session: Ctrl-C in the terminal reaches the supervisor only, which stops children in order.
            return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def respawn(self, child: Child) -> None:
        """Start an exited child again, with the same command line and environment."""
        child.proc = self._popen(child.cmd, child.env, child.log_path)

    def ready(self) -> bool:
        """The API answers /readyz and every worker process that is alive now has announced itself ready.

        Fleet entries are matched to live worker processes by pid: a dead worker's entry outlives it by up
        to a heartbeat TTL and must not count.
        """
        workers = [c for c in self.children if c.name.startswith("worker")]
        live = {c.proc.pid for c in workers if c.proc.poll() is None}
        if len(live) < len(workers):
            return False
        try:
            if httpx.get(f"{self.api_url}/readyz", timeout=2).status_code != 200:
                return False
            members = Fleet(connect(self.redis_url)).members()
        except (httpx.HTTPError, redis.RedisError):
            return False
        ready = {m.get("pid") for m in members if m.get("ready")}
        return live <= ready

    def ready_worker_pids(self) -> set[int]:
        """Pids of worker processes that have announced themselves ready (empty while Redis is away)."""
        try:
            return {int(m["pid"]) for m in Fleet(connect(self.redis_url)).members() if m.get("ready") and m.get("pid")}
        except redis.RedisError:
            return set()

    def wait_ready(self, timeout: float = 180.0, workers: int | None = None) -> None:
        """Wait until the API answers /readyz and every worker process reports ready."""
        expected = workers if workers is not None else sum(1 for c in self.children if c.name.startswith("worker"))
        deadline = time.monotonic() + timeout
        fleet = Fleet(connect(self.redis_url))
        while time.monotonic() < deadline:
            self.check_alive()
            if workers is None:
                if self.ready():
                    return
            else:
                try:
                    ready = httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200
                    # Workers started elsewhere (tests) announce themselves in Redis, models or not.
                    if ready and sum(1 for m in fleet.members() if m.get("ready")) >= expected:
                        return
                except (httpx.HTTPError, redis.RedisError):
                    pass
            time.sleep(0.5)
        raise TimeoutError(f"cluster not ready after {timeout:.0f}s; logs in {self.log_dir}")

    def check_alive(self) -> None:
        for c in self.children:
            code = c.proc.poll()
            if code is not None:
                tail = c.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{c.name} exited with code {code}; last log lines:\n{tail}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (graceful: workers finish or hand back their work), then SIGKILL stragglers."""
        for c in reversed(self.children):
            if c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for c in self.children:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                c.proc.wait(remaining)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
        self.children.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    @contextlib.contextmanager
    def running(self, timeout: float = 180.0) -> Iterator[Cluster]:
        self.start()
        try:
            self.wait_ready(timeout)
            yield self
        finally:
            self.stop()
