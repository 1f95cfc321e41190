"""kombu's Redis transport, with one failure while Redis is down turned into the connection error it is.

When a worker loses Redis, Celery's consumer closes the broken connection, and closing a channel puts
the messages it delivered but did not acknowledge back on their queues. kombu can close the
transport first (its ``client`` becomes None) and a channel after it; that channel then builds a new
connection pool from ``client`` and fails with ``AttributeError``. Celery lets connection errors pass
while it closes a lost connection, but takes any other error as unrecoverable and the worker exits:
a Redis restart then cost every worker that hit the race (seen as "Unrecoverable error:
AttributeError(\"'NoneType' object has no attribute 'hostname'\")" right after "Restoring N
unacknowledged message(s)").

Here that case raises ``redis.ConnectionError``: the close goes on, the worker reconnects, and the
messages stay in kombu's unacked hash in Redis, from where the worker's reconnect hand-back
(``workers.reconnect``) or the visibility timeout puts them back.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection was closed while this channel was closing")
        return super()._connparams(asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
"""The ``broker_transport`` setting that selects this transport for a ``redis://`` broker URL."""
