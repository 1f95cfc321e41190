"""Shared fixtures: a real Redis, the tiny models, settings and a running cluster.

Redis is the machine's local server on 127.0.0.1:6379 when it answers, in its own database number
(``QUEUEFORMER_TEST_REDIS_DB``, default 14, flushed around each use); otherwise an embedded Valkey
server started here. Tests that stop or restart Redis always start their own server.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
MARKERS = {
    "unit": "unit",
    "integration": "redis",
    "model": "model",
    "gpu": "gpu",
    "chaos": "chaos",
    "deploy": "deploy",
    "browser": "browser",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test directory carries its marker, so `-m unit` and friends select by directory."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts and parts[0] in MARKERS:
            item.add_marker(getattr(pytest.mark, MARKERS[parts[0]]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_redis_answers() -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (without a db number) of the Redis the tests use."""
    if _local_redis_answers() and not os.environ.get("QUEUEFORMER_TEST_EMBEDDED"):
        yield "redis://127.0.0.1:6379"
        return
    from queueformer.server.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("valkey"), port=free_port())
    server.start()
    try:
        yield server.base_url  # carries the server's password
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """A flushed database for one test."""
    db = int(os.environ.get("QUEUEFORMER_TEST_REDIS_DB", "14"))
    url = f"{redis_server}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


# The one folder of tiny models per checkout: `make setup` builds it (and `make demo` serves from it,
# as data_dir/models); the tests read it.
TINY_MODELS = ROOT / ".queueformer" / "models"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build missing tiny models before the first test runs, outside every test's timeout.

    `make setup` has normally built them already; this covers a bare `pytest` on a fresh checkout, and
    only when a selected test uses them. Built models are recognised by their recipe stamp and skipped.
    """
    if any("tiny_models" in getattr(item, "fixturenames", ()) for item in session.items):
        from workers.tiny_models import NAMES, _built, recipe

        want = recipe()
        if not all(_built(TINY_MODELS / name, want) for name in NAMES):
            from workers.tiny_models import build_all

            session.config.get_terminal_writer().line(f"building the tiny models into {TINY_MODELS} (once)")
            build_all(TINY_MODELS)


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """The tiny offline models (built by setup, or before the first test that needs them)."""
    return TINY_MODELS


@pytest.fixture(scope="module")
def module_redis_url(redis_server: str) -> Iterator[str]:
    """A flushed database shared by one module's tests (e.g. around a running cluster)."""
    db = int(os.environ.get("QUEUEFORMER_TEST_REDIS_DB_MODULE", "13"))
    url = f"{redis_server}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
