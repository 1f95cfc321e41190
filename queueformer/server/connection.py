"""The Redis client every server-side process uses."""

from __future__ import annotations

import redis


def connect(url: str) -> redis.Redis:
    """A client with timeouts: a broker that vanishes must surface as an error, not hang a request."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=30,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry_on_timeout=True,
    )
