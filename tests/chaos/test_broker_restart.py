"""Redis (our own embedded Valkey, AOF on) killed and restarted: accepted work survives and finishes."""

from __future__ import annotations

import time
from typing import Any

import redis

from queueformer.client import Client
from queueformer.server.cluster import Cluster
from queueformer.server.embedded import EmbeddedRedis
from tests.chaos.test_worker_kills import batch_lines, fleet_id
from tests.helpers import eventually, jsonl


def restart(server: EmbeddedRedis, down_s: float = 2.0) -> float:
    """SIGKILL the server (no shutdown save: only the AOF survives), wait, start it again; returns the kill time."""
    server.kill()
    killed = time.monotonic()
    time.sleep(down_s)
    server.start()
    return killed


def test_a_batch_completes_across_a_redis_restart(chaos_cluster: tuple[Cluster, Any], own_redis: EmbeddedRedis) -> None:
    cluster, new_worker = chaos_cluster
    with Client(cluster.api_url, timeout=60) as qf:
        batch = qf.create_batch(qf.upload(jsonl(batch_lines(500, 32)))["id"], "/v1/jobs")
        new_worker(["tiny-gpt2"])
        before = eventually(
            lambda: (c := qf.batch(batch["id"])["request_counts"])["completed"] >= 50 and c, timeout=120, interval=0.2
        )
        assert before["completed"] < 450, before  # the restart lands mid-batch
        killed = restart(own_redis)
        back = eventually(lambda: _batch(qf, batch["id"], finished=False), timeout=120, interval=0.1)
        api_down_s = time.monotonic() - killed
        # Work resumes: commits that were waiting out the outage land, then new lines run.
        eventually(
            lambda: (
                (b := _batch(qf, batch["id"], finished=False))
                and b["request_counts"]["completed"] > before["completed"]
            ),
            timeout=120,
            interval=0.2,
        )
        resumed_s = time.monotonic() - killed
        done = eventually(lambda: _batch(qf, batch["id"]), timeout=600, interval=1.0)
        finished_s = time.monotonic() - killed
        assert done["status"] == "completed", done
        assert done["request_counts"] == {"total": 500, "completed": 500, "failed": 0}
        out, err = qf.batch_results(done)
        assert err == [] and sorted(o["custom_id"] for o in out) == sorted(f"line-{i}" for i in range(500))
    print(
        f"Redis SIGKILLed at {before['completed']}/500 lines, restarted after 2s: API answering again after "
        f"{api_down_s:.1f}s (batch {back['status']} at {back['request_counts']['completed']}), commits resumed "
        f"after {resumed_s:.1f}s, batch completed {finished_s:.1f}s after the kill"
    )


def test_accepted_jobs_survive_a_redis_restart_before_any_worker_runs(
    chaos_cluster: tuple[Cluster, Any], own_redis: EmbeddedRedis
) -> None:
    cluster, new_worker = chaos_cluster
    with Client(cluster.api_url, timeout=60) as qf:
        ids = qf.submit_many([{"task": "echo", "model": "echo", "text": str(i)} for i in range(500)])
        killed = restart(own_redis)
        new_worker(["echo"])
        states = eventually(lambda: _states(qf, ids), timeout=300, interval=1.0)
        assert states == ["succeeded"] * 500
        assert [qf.result(i)["text"] for i in ids] == [str(i) for i in range(500)]
    print(
        f"500 jobs accepted before a Redis SIGKILL: all succeeded {time.monotonic() - killed:.1f}s after it "
        "(worker start included)"
    )


def _batch(qf: Client, batch_id: str, finished: bool = True) -> dict[str, Any] | None:
    try:
        b = qf.batch(batch_id)
    except Exception:  # the API answers 503 while Redis is down
        return None
    return b if not finished or b["status"] in ("completed", "failed", "cancelled", "expired") else None


def _states(qf: Client, ids: list[str]) -> list[str] | None:
    try:
        states = [qf.job(i)["state"] for i in ids]
    except Exception:
        return None
    return states if all(s in ("succeeded", "failed") for s in states) else None


def test_messages_a_live_worker_could_not_hand_back_with_redis_down_come_back_with_it(
    chaos_cluster: tuple[Cluster, Any], own_redis: EmbeddedRedis
) -> None:
    """A chunk that finds every line slot busy goes back to its queue (a reject with requeue, every half second
    while a batch has more chunks than slots). With Redis down that reject fails, and the message stays
    unacknowledged under a worker that lives on: no heartbeat sweep applies, and without a hand-back on
    reconnect it would wait out the visibility timeout (an hour) and the batch with it."""
    cluster, new_worker = chaos_cluster
    r = redis.Redis.from_url(own_redis.url, decode_responses=True)
    with Client(cluster.api_url, timeout=60) as qf:
        batch = qf.create_batch(qf.upload(jsonl(batch_lines(1000, 64)))["id"], "/v1/jobs")  # 16 chunks, 7 slots
        worker = new_worker(["tiny-gpt2"])
        eventually(lambda: qf.batch(batch["id"])["request_counts"]["completed"] >= 50, timeout=120, interval=0.2)
        killed = restart(own_redis)
        done = eventually(lambda: _batch(qf, batch["id"]), timeout=180, interval=1.0)
        took = time.monotonic() - killed
        assert done["request_counts"] == {"total": 1000, "completed": 1000, "failed": 0}, done
        assert worker.proc.poll() is None and fleet_id(r, worker.proc.pid)  # one worker, alive throughout
    print(f"1,000-line batch, more chunks than slots, Redis SIGKILLed mid-batch: completed {took:.1f}s after the kill")
