"""Heartbeat-based recovery on a real Redis: a dead worker's unacknowledged messages go back to their queue
through kombu's own restore, its executing lines (only those) take strikes, and a live worker's messages
stay where they are however old they are."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
import redis

from queueformer.contract.registry import Registry
from queueformer.contract.units import JobsUnit
from queueformer.server import keys
from queueformer.server.broker import make_celery, publish, restore_deliveries
from queueformer.server.connection import connect
from queueformer.server.fleet import Fleet
from queueformer.server.liveness import ALONE, Custody, Liveness, line_member
from tests.helpers import make_settings
from workers.reconnect import hand_back_dropped


def queued(r: redis.Redis) -> int:
    """Messages waiting on the echo queue, at any priority."""
    return sum(int(r.llen(name)) for name in keys.queue_lists("echo"))


@contextlib.contextmanager
def delivered(app: Any, n: int, name: str) -> Iterator[list[kombu.Message]]:
    """Publish ``n`` echo units and take them as a worker would: delivered, unacknowledged, held here."""
    with app.connection_for_read() as conn:
        channel = conn.channel()
        queue = kombu.Queue("echo", exchange=kombu.Exchange("echo", type="direct"), routing_key="echo")
        got: list[kombu.Message] = []
        consumer = kombu.Consumer(channel, queues=[queue], callbacks=[lambda _b, m: got.append(m)], accept=["json"])
        channel.basic_qos(0, 10, False)
        for i in range(n):
            publish(app, JobsUnit(model="echo", ids=[f"job-{name}{i:08d}"]), "echo")
        consumer.consume()
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=1)
        try:
            yield got
        finally:
            consumer.cancel()


@pytest.fixture
def app(redis_url: str, tmp_path: Path) -> Any:
    return make_celery(make_settings(redis_url, tmp_path), Registry.load("tiny"))


def test_a_dead_workers_messages_go_back_and_only_its_executing_lines_are_struck(app: Any, redis_url: str) -> None:
    r = connect(redis_url)
    with delivered(app, 3, "live") as got:
        tags = [str(m.delivery_tag) for m in got]
        assert len(tags) == 3 and r.hlen(keys.UNACKED) == 3 and queued(r) == 0

        batch = "batch_livetest"
        r.hset(keys.batch(batch), mapping={"status": "in_progress"})
        live, dead = Custody(r, "live-1"), Custody(r, "dead-1")
        Fleet(r).announce("live-1", {"queues": ["echo"]})
        live.took(tags[0])
        for tag in tags[1:]:
            dead.took(tag)
        live.begin([line_member(batch, 1)])
        dead.begin([line_member(batch, 2), line_member(batch, 3) + ALONE])  # line 4 only waited: no record

        liveness = Liveness(r, lambda t: restore_deliveries(app, t))
        now = time.time()
        assert liveness.sweep(now=now).dead == []  # a first sighting: its heartbeat may be back in a moment
        # Long past the visibility timeout of a live worker's message: it stays with its worker.
        report = liveness.sweep(now=now + 7200)
        assert report.dead == ["dead-1"] and report.restored == 2 and report.orphans == 0
        assert sorted(report.struck) == sorted([line_member(batch, 2), line_member(batch, 3) + ALONE])
        assert queued(r) == 2 and r.hkeys(keys.UNACKED) == [tags[0]]
        restored = [json.loads(m) for name in keys.queue_lists("echo") for m in r.lrange(name, 0, -1)]
        assert all(m["headers"]["redelivered"] for m in restored)
        assert r.hgetall(keys.batch_part(batch, "strikes")) == {"2": "1", "3": "1", "3:alone": "1"}
        assert not r.exists(keys.worker_deliveries("dead-1"), keys.worker_executing("dead-1"))

        # The live worker acknowledges its message: the next sweep drops it from its record.
        got[0].ack()
        assert liveness.sweep().dead == []
        assert r.smembers(keys.worker_deliveries("live-1")) == set()
        # Its heartbeat lapses (SIGKILL): its executing line is struck, nothing is left to restore.
        Fleet(r).leave("live-1")
        assert liveness.sweep(now=now + 7201).dead == []
        report = liveness.sweep(now=now + 7204)
        assert report.dead == ["live-1"] and report.struck == [line_member(batch, 1)]


def test_a_message_no_worker_claims_goes_back_after_the_orphan_delay(app: Any, redis_url: str) -> None:
    r = connect(redis_url)
    with delivered(app, 1, "orphan") as got:
        assert len(got) == 1 and r.hlen(keys.UNACKED) == 1
        liveness = Liveness(r, lambda t: restore_deliveries(app, t), orphan_after_s=60)
        assert liveness.sweep().orphans == 0  # taken a moment ago: its worker may be recording it
        assert liveness.sweep(now=time.time() + 61).orphans == 1
        assert queued(r) == 1 and r.hlen(keys.UNACKED) == 0


def test_strikes_never_recreate_an_expired_record(redis_url: str) -> None:
    r = connect(redis_url)
    dead = Custody(r, "gone-1")
    dead.begin(["job:job-expired0001", line_member("batch_gone", 7)])
    liveness = Liveness(r, lambda _t: None, confirm_s=0)
    liveness.sweep()
    report = liveness.sweep()
    assert report.dead == ["gone-1"]
    assert not r.exists(keys.job("job-expired0001"), keys.batch_part("batch_gone", "strikes"))


def test_a_heartbeat_that_comes_back_before_confirmation_spares_the_worker(redis_url: str) -> None:
    """A worker whose heartbeat lapsed while Redis restarted announces again: it is not buried."""
    r = connect(redis_url)
    Custody(r, "w-1").begin([line_member("batch_x", 1)])
    r.hset(keys.batch("batch_x"), "status", "in_progress")
    liveness = Liveness(r, lambda _t: None, confirm_s=3)
    now = time.time()
    assert liveness.sweep(now=now).dead == []
    Fleet(r).announce("w-1", {})
    assert liveness.sweep(now=now + 5).dead == []
    Fleet(r).leave("w-1")
    assert liveness.sweep(now=now + 6).dead == []  # a new first sighting
    assert liveness.sweep(now=now + 9).dead == ["w-1"]
    assert r.hgetall(keys.batch_part("batch_x", "strikes")) == {"1": "1"}


def test_a_live_worker_hands_back_on_reconnect_what_its_tasks_no_longer_hold(app: Any, redis_url: str) -> None:
    """A reject or ack that failed while Redis was down leaves a message unacknowledged under a worker that lives
    on; when its connection returns, every recorded delivery none of its tasks holds goes back to its queue."""
    r = connect(redis_url)
    with delivered(app, 3, "back") as got:
        running, stranded, acked = (str(m.delivery_tag) for m in got)
        custody = Custody(r, "alive-1")
        for tag in (running, stranded, acked):
            custody.took(tag)
        got[2].ack()

        back = hand_back_dropped(r, "alive-1", {running}, lambda t: restore_deliveries(app, t))
        assert back == [stranded]  # the running one stays; the acknowledged one is gone already
        assert queued(r) == 1 and r.hkeys(keys.UNACKED) == [running]
        assert r.smembers(keys.worker_deliveries("alive-1")) == {running}
        assert hand_back_dropped(r, "alive-1", {running}, lambda t: restore_deliveries(app, t)) == []
