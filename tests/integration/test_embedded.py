"""The embedded Valkey that `queueformer up` and the tests start: a real server that requires the
password it generated, hands out URLs that carry it, and keeps it across restarts of its data dir."""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from queueformer.server.cluster import Cluster
from queueformer.server.embedded import PASSWORD_FILE, EmbeddedRedis
from tests.conftest import free_port
from tests.helpers import eventually, make_settings


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    s = EmbeddedRedis(tmp_path / "valkey", port=free_port())
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_a_client_without_the_password_is_refused(server: EmbeddedRedis) -> None:
    anonymous = redis.Redis(host="127.0.0.1", port=server.port, socket_connect_timeout=2)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with pytest.raises(redis.AuthenticationError):
        anonymous.set("k", "v")
    wrong = redis.Redis(host="127.0.0.1", port=server.port, password="not-the-password", socket_connect_timeout=2)
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()


def test_the_url_it_hands_out_carries_the_password(server: EmbeddedRedis) -> None:
    assert server.url == f"redis://:{server.password}@127.0.0.1:{server.port}/0"
    assert len(server.password) == 64
    client = redis.Redis.from_url(server.url)
    assert client.ping()
    client.set("k", "v")
    assert redis.Redis.from_url(f"{server.base_url}/3").ping()  # tests append their own db number
    assert redis.Redis.from_url(server.url).get("k") == b"v"


def test_the_password_is_private_and_never_logged(
    tmp_path: Path, server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "valkey"
    assert stat.S_IMODE((data_dir / PASSWORD_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700  # valkey.conf and the AOF live here too
    assert (data_dir / PASSWORD_FILE).read_text().strip() == server.password
    assert server.password not in server.display_url and str(server.port) in server.display_url
    # The server's own argv shows only its config file, not the password.
    cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()
    assert server.password not in cmdline
    with caplog.at_level(logging.INFO, logger="queueformer.server.embedded"):
        other = EmbeddedRedis(tmp_path / "other", port=free_port())
        other.start()
        other.stop()
    assert "embedded valkey on redis://:***@" in caplog.text
    assert other.password not in caplog.text


def test_a_restart_on_the_same_data_dir_keeps_the_password(server: EmbeddedRedis, tmp_path: Path) -> None:
    url, password = server.url, server.password
    client = redis.Redis.from_url(url)
    client.set("kept", "1")
    server.kill()  # a crash: only the AOF survives
    server.start()
    assert server.url == url
    assert client.get("kept") == b"1"  # the client's URL is still valid after the restart
    server.stop()

    # A fresh object on the same data dir (as `queueformer up` run again) reuses it too.
    again = EmbeddedRedis(tmp_path / "valkey", port=server.port)
    assert again.password == password
    again.start()
    try:
        assert redis.Redis.from_url(url).get("kept") == b"1"
    finally:
        again.stop()

    # Another data dir gets another password.
    assert EmbeddedRedis(tmp_path / "elsewhere").password != password


def test_a_cluster_on_its_embedded_server_serves_with_the_password(tmp_path: Path) -> None:
    """`queueformer up` without QUEUEFORMER_REDIS_URL: the cluster starts its own server and hands the
    password-carrying URL to the API (which answers /readyz only when Redis does) and to Flower, which
    gets it through CELERY_BROKER_URL (not --broker, which `ps` shows) and reads the broker with it:
    /api/queues/length answers only when the password is right."""
    settings = make_settings("redis://unused", tmp_path).model_copy(update={"redis_url": None})
    cluster = Cluster(settings, api_port=free_port(), flower_port=free_port(), worker_groups=[])
    try:
        cluster.start()
        assert cluster.redis is not None
        server = cluster.redis
        assert cluster.redis_url == server.url and server.password in server.url
        cluster.wait_ready(timeout=120, workers=0)
        flower = next(c for c in cluster.children if c.name == "flower")
        assert server.password not in " ".join(str(a) for a in flower.proc.args)
        assert cluster.flower_auth is not None
        user, _, password = cluster.flower_auth.partition(":")

        def queues() -> httpx.Response | None:
            try:
                return httpx.get(
                    f"http://127.0.0.1:{cluster.flower_port}/api/queues/length", auth=(user, password), timeout=10
                )
            except httpx.HTTPError:
                return None

        response = eventually(queues, timeout=60, interval=0.5)
        assert response.status_code == 200, response.text
        assert "active_queues" in response.json()
    finally:
        cluster.stop()
    assert cluster.redis is None  # stopped with the cluster
    logs = "".join(p.read_text() for p in cluster.log_dir.glob("*.log"))
    assert "Connected to redis://:**@127.0.0.1" in logs
    assert server.password not in logs
    assert (settings.data_dir / "valkey" / PASSWORD_FILE).read_text().strip() == server.password
