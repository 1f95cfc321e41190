"""Workers SIGKILLed mid-batch and mid-job: every accepted line and job finishes exactly once."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

import pytest
import redis

from queueformer.client import Client
from queueformer.server import keys
from queueformer.server.cluster import Cluster
from queueformer.server.fleet import Fleet
from tests.helpers import eventually, jsonl


def batch_lines(n: int, new_tokens: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/jobs",
            "body": {
                "task": "generate",
                "model": "tiny-gpt2",
                "prompt": f"The weather {i}",
                "max_new_tokens": new_tokens,
                "ignore_eos": True,
            },
        }
        for i in range(n)
    ]


def fleet_id(r: redis.Redis, pid: int) -> str | None:
    """The fleet id of the worker process ``pid`` (its heartbeat), once it announced itself."""
    return next((m["id"] for m in Fleet(r).members() if m.get("pid") == pid), None)


def kill_and_time_recovery(r: redis.Redis, worker: Any) -> tuple[float, int]:
    """SIGKILL ``worker``; return the seconds until its messages were back on their queues, and how many."""
    return kill(r, worker)()


def kill(r: redis.Redis, worker: Any) -> Callable[[], tuple[float, int]]:
    """SIGKILL ``worker`` now; the returned call waits until its messages are back on their queues and
    returns the seconds that took (from the kill) and how many there were."""
    wid = fleet_id(r, worker.proc.pid)
    assert wid is not None
    worker.kill()
    killed = time.monotonic()
    tags = cast(set[str], r.smembers(keys.worker_deliveries(wid)))

    def handed_back() -> bool:
        if r.exists(keys.worker_deliveries(wid)):
            return False
        # A restored message keeps its delivery tag: one already delivered again is unacknowledged once more,
        # now under a live worker that recorded it. Only a tag no worker holds is still waiting on the dead one.
        elsewhere: set[str] = set()
        for key in r.scan_iter(keys.DELIVERIES_PATTERN):
            elsewhere |= cast(set[str], r.smembers(key))
        p = r.pipeline(transaction=False)
        for tag in tags:
            p.hexists(keys.UNACKED, tag)
        return not any(there and tag not in elsewhere for tag, there in zip(tags, p.execute(), strict=True))

    def wait() -> tuple[float, int]:
        eventually(handed_back, timeout=120, interval=0.1)
        return time.monotonic() - killed, len(tags)

    return wait


@pytest.mark.timeout(1800)  # 2,000 lines on a busy 2-core machine; the kills themselves cost seconds
def test_a_batch_survives_five_worker_kills(chaos_cluster: tuple[Cluster, Any]) -> None:
    """Default settings: every kill costs seconds (not the hour-long visibility timeout), no line is
    quarantined for having waited behind a crash, and every line is committed once."""
    cluster, new_worker = chaos_cluster
    assert cluster.settings.redis_url is not None
    r = redis.Redis.from_url(cluster.settings.redis_url.get_secret_value(), decode_responses=True)
    with Client(cluster.api_url) as qf:
        total = 2000
        batch = qf.create_batch(qf.upload(jsonl(batch_lines(total, 192)))["id"], "/v1/jobs")

        def completed() -> int:
            return int(qf.batch(batch["id"])["request_counts"]["completed"])

        worker = new_worker(["tiny-gpt2"])
        # Each worker is killed as soon as it has committed work, and a dead worker's messages are awaited
        # beside the loop: every kill lands mid-batch, however fast the machine.
        handbacks: list[Future[tuple[float, int]]] = []
        floor = 50
        started = time.monotonic()
        with ThreadPoolExecutor(5) as pool:
            while len(handbacks) < 5:
                eventually(lambda w=worker: fleet_id(r, w.proc.pid), timeout=120, interval=0.2)
                eventually(lambda f=floor: completed() >= f, timeout=300, interval=0.2)
                handbacks.append(pool.submit(kill(r, worker)))
                at_kill = completed()  # the worker is gone: only its successor's commits raise this
                assert at_kill < total, f"the batch finished before kill {len(handbacks)}: make it longer"
                print(f"kill {len(handbacks)} at {at_kill}/{total} lines")
                floor = at_kill + 1
                worker = new_worker(["tiny-gpt2"])
            stalls = [f.result() for f in handbacks]
        done = qf.wait_batch(batch["id"], timeout=600, poll_s=0.5)
        elapsed = time.monotonic() - started
        assert done["status"] == "completed", done
        assert done["request_counts"] == {"total": total, "completed": total, "failed": 0}  # 0 worker_lost
        out, err = qf.batch_results(done)
        ids = [o["custom_id"] for o in out]
        assert err == [] and len(ids) == total and set(ids) == {f"line-{i}" for i in range(total)}  # 0 duplicates
    strikes = r.hgetall(keys.batch_part(batch["id"], "strikes"))
    print(
        f"5 SIGKILLs (default settings): {total}-line batch done in {elapsed:.0f}s, {total} succeeded, 0 worker_lost, "
        f"0 duplicated; each kill's messages back on the queue after "
        + ", ".join(f"{s:.1f}s ({n} messages)" for s, n in stalls)
        + f"; {len([k for k in strikes if not k.endswith(':alone')])} lines were executing at a death"
    )
    assert all(s <= 15 for s, _ in stalls), stalls  # heartbeat TTL 8 s, a second look 3 s later, 1 s sweeps


def test_single_jobs_survive_a_worker_kill(chaos_cluster: tuple[Cluster, Any]) -> None:
    cluster, new_worker = chaos_cluster
    with Client(cluster.api_url) as qf:
        jobs = [
            {
                "task": "generate",
                "model": "tiny-gpt2",
                "prompt": f"A queue holds {i}",
                "max_new_tokens": 64,
                "ignore_eos": True,
            }
            for i in range(300)
        ]
        ids = qf.submit_many(jobs)
        worker = new_worker(["tiny-gpt2"])
        eventually(lambda: sum(qf.job(i)["state"] == "succeeded" for i in ids[:40]) >= 10, timeout=120, interval=0.2)
        worker.kill()
        new_worker(["tiny-gpt2"])
        records = [qf.wait(i, timeout=300) for i in ids]
        assert [r["state"] for r in records] == ["succeeded"] * len(ids)
        redelivered = [r for r in records if r["attempts"] > 1]
        assert redelivered, "the kill should have caught some jobs in flight"
        # a job run twice still has one result, and its record says so once
        assert all(qf.result(r["id"])["usage"]["completion_tokens"] == 64 for r in redelivered)


def test_sigterm_drains_in_flight_work_and_hands_back_the_rest(chaos_cluster: tuple[Cluster, Any]) -> None:
    cluster, new_worker = chaos_cluster
    with Client(cluster.api_url) as qf:
        batch = qf.create_batch(qf.upload(jsonl(batch_lines(400, 64)))["id"], "/v1/jobs")
        worker = new_worker(["tiny-gpt2"])
        eventually(lambda: qf.batch(batch["id"])["request_counts"]["completed"] >= 20, timeout=120, interval=0.2)
        before = qf.batch(batch["id"])["request_counts"]["completed"]
        started = time.monotonic()
        assert worker.terminate(timeout=120) == 0  # warm shutdown: finish what is running, then exit cleanly
        drain_s = time.monotonic() - started
        drained = qf.batch(batch["id"])["request_counts"]["completed"] - before
        new_worker(["tiny-gpt2"])
        done = qf.wait_batch(batch["id"], timeout=600, poll_s=0.5)
        assert done["request_counts"] == {"total": 400, "completed": 400, "failed": 0}
        out, _ = qf.batch_results(done)
        assert sorted(o["custom_id"] for o in out) == sorted(f"line-{i}" for i in range(400))
        print(f"SIGTERM drain took {drain_s:.1f}s and committed {drained} lines; the rest went to the next worker")
        assert json.dumps(done)  # the batch object stays serialisable end to end
