"""After the broker connection comes back, hand back the messages this worker dropped when it was lost.

When Celery loses its broker connection it forgets every message it had received but not started
(``Consumer.on_close``), trusting kombu to put them back when the channel closes. With the broker itself
down (a Redis restart) that restore fails, and each such message stays in kombu's ``unacked`` hash under
a worker that is alive and keeps heartbeating: the liveness sweep never buries it and the audit sees the
message held, so it would come back only after the visibility timeout (an hour). So on every reconnect
this consumer step hands back, through kombu's own ``restore_by_tag``, each delivery this worker recorded
(``workers.custody``) that none of its tasks holds. Celery's own request registry cannot say which those
are (it is empty once the consumer restarts), so the tasks' holds are the record. A tag already
acknowledged or restored is a no-op. The same happens to a message whose reject (a chunk finding every
line slot busy goes back to its queue) failed because the broker was down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import redis
from celery import bootsteps

from queueformer.server import keys

log = logging.getLogger(__name__)

Restore = Callable[[list[str]], None]


def hand_back_dropped(client: redis.Redis, worker_id: str, held: set[str], restore: Restore) -> list[str]:
    """Restore every recorded delivery of ``worker_id`` that is not in ``held`` and is still unacknowledged."""
    key = keys.worker_deliveries(worker_id)
    took = cast(set[str], client.smembers(key))
    dropped = sorted(took - held)
    if not dropped:
        return []
    p = client.pipeline(transaction=False)
    for tag in dropped:
        p.hexists(keys.UNACKED, tag)
    waiting = [tag for tag, there in zip(dropped, p.execute(), strict=True) if there]
    if waiting:
        restore(waiting)
    client.srem(key, *dropped)
    return waiting


def reconnect_step(
    client: redis.Redis, worker_id: str, held: Callable[[], set[str]], restore: Restore
) -> type[bootsteps.StartStopStep]:
    """A consumer bootstep that runs :func:`hand_back_dropped` on every start after the first; ``held`` gives
    the tags this worker's tasks hold (``LeaseKeeper.held``: running, or waiting for a slot)."""

    class HandBackDropped(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.connection:Connection",)
        starts = 0

        def start(self, parent: Any) -> None:
            type(self).starts += 1
            if type(self).starts == 1:
                return  # the first connection: nothing received yet
            try:
                back = hand_back_dropped(client, worker_id, held(), restore)
            except redis.RedisError as exc:  # the sweep's orphan rule still restores them, later
                log.warning("could not hand back messages dropped with the broker connection: %s", exc)
                return
            if back:
                log.warning("broker connection back: %d messages dropped with it are on their queues again", len(back))

    return HandBackDropped
