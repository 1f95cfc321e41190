"""Chaos fixtures: a Redis of the test's own (embedded Valkey, AOF on, on a free port) and workers
the test can SIGKILL and restart. The machine's shared Redis is never stopped or touched here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from queueformer.server.cluster import Cluster
from queueformer.server.embedded import EmbeddedRedis
from tests.conftest import free_port
from tests.helpers import make_settings


class Worker:
    """A `queueformer worker` subprocess that can be killed like a preempted pod."""

    def __init__(self, env: dict[str, str], queues: list[str], log_path: Path) -> None:
        self.env, self.queues, self.log_path = env, queues, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        out = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.main", "--queues", *self.queues, "--concurrency", "8"],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "valkey", port=free_port(), aof=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def chaos_cluster(own_redis: EmbeddedRedis, tiny_models: Path, tmp_path: Path) -> Iterator[tuple[Cluster, Any]]:
    """The API alone on its own Redis; tests start (and kill) workers with the returned factory."""
    # The settings users get: default visibility timeout, delivery limits and audit intervals.
    settings = make_settings(own_redis.url, tmp_path, tiny_models, quota={"max_enqueued_tokens": 10**9})
    cluster = Cluster(settings, api_port=free_port(), worker_groups=[])
    cluster.start()
    workers: list[Worker] = []
    env = cluster.child_env(own_redis.url)

    def new_worker(queues: list[str]) -> Worker:
        w = Worker(env, queues, tmp_path / f"worker-{len(workers)}.log").start()
        workers.append(w)
        return w

    try:
        cluster.wait_ready(timeout=120, workers=0)
        yield cluster, new_worker
    finally:
        for w in workers:
            w.stop()
        cluster.stop()
