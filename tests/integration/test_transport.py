"""A channel that closes after its transport (a worker losing Redis) fails with a connection error.

Celery closes a lost connection ignoring connection errors only; kombu's stock Redis transport raised
``AttributeError`` there, and the worker exited ("Unrecoverable error") in the middle of a Redis restart.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis

from queueformer.contract.registry import Registry
from queueformer.server.broker import make_celery
from queueformer.server.transport import TRANSPORT, Transport
from tests.helpers import make_settings


def _deliver_unacked(conn: Connection) -> tuple[object, str]:
    """Publish one message and receive it without acknowledging; returns (channel, delivery tag)."""
    queue = Queue("qf-transport-test", Exchange("qf-transport-test"), "qf-transport-test")
    channel = conn.channel()
    bound = queue(channel)
    bound.declare()
    producer = conn.Producer(channel)
    producer.publish({"n": 1}, exchange=queue.exchange, routing_key="qf-transport-test", serializer="json")
    message = bound.get(no_ack=False)
    assert message is not None
    return channel, message.delivery_tag


def test_the_workers_and_the_api_use_this_transport(redis_url: str, tmp_path: Path) -> None:
    app = make_celery(make_settings(redis_url, tmp_path), Registry.load("tiny"))
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)


def test_a_channel_closing_after_its_transport_raises_a_connection_error(redis_url: str) -> None:
    # kombu 5.7's stock transport raises AttributeError here (Connection(redis_url) in place of ours).
    with Connection(redis_url, transport=TRANSPORT) as conn:
        assert isinstance(conn.transport, Transport)
        channel, tag = _deliver_unacked(conn)
        conn._do_close_transport()  # kombu's own order when it closes a lost connection
        with pytest.raises(redis.ConnectionError) as raised:
            channel.close()  # type: ignore[attr-defined]
        # the error is one Celery lets pass while it closes a lost connection
        assert isinstance(raised.value, kombu_redis.Transport.connection_errors)
    # The message stays in kombu's unacked hash, from where it is handed back or restored.
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.hexists("unacked", tag)
    finally:
        client.close()


def test_a_healthy_close_still_puts_unacknowledged_messages_back(redis_url: str) -> None:
    with Connection(redis_url, transport=TRANSPORT) as conn:
        channel, tag = _deliver_unacked(conn)
        channel.close()  # type: ignore[attr-defined]
    client = redis.Redis.from_url(redis_url)
    try:
        assert not client.hexists("unacked", tag)
        assert client.llen("qf-transport-test") == 1
    finally:
        client.close()
