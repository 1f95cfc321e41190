"""Redis (our own embedded Valkey, AOF on) killed and restarted: accepted work survives and finishes."""

from __future__ import annotations

import time
from typing import Any

from queueformer.client import Client
from queueformer.cluster import Cluster
from queueformer.embedded import EmbeddedRedis
from tests.chaos.test_worker_kills import batch_lines
from tests.helpers import eventually, jsonl


def restart(server: EmbeddedRedis, down_s: float = 2.0) -> None:
    server.kill()  # SIGKILL: no shutdown save; only the AOF survives
    time.sleep(down_s)
    server.start()


def test_a_batch_completes_across_a_redis_restart(chaos_cluster: tuple[Cluster, Any], own_redis: EmbeddedRedis) -> None:
    cluster, new_worker = chaos_cluster
    with Client(cluster.api_url, timeout=60) as qf:
        batch = qf.create_batch(qf.upload(jsonl(batch_lines(500, 32)))["id"], "/v1/jobs")
        new_worker(["tiny-gpt2"])
        eventually(lambda: qf.batch(batch["id"])["request_counts"]["completed"] >= 50, timeout=120, interval=0.2)
        restart(own_redis)
        done = eventually(lambda: _batch(qf, batch["id"]), timeout=600, interval=1.0)
        assert done["status"] == "completed", done
        assert done["request_counts"] == {"total": 500, "completed": 500, "failed": 0}
        out, err = qf.batch_results(done)
        assert err == [] and sorted(o["custom_id"] for o in out) == sorted(f"line-{i}" for i in range(500))


def test_accepted_jobs_survive_a_redis_restart_before_any_worker_runs(
    chaos_cluster: tuple[Cluster, Any], own_redis: EmbeddedRedis
) -> None:
    cluster, new_worker = chaos_cluster
    with Client(cluster.api_url, timeout=60) as qf:
        ids = qf.submit_many([{"task": "echo", "model": "echo", "text": str(i)} for i in range(500)])
        restart(own_redis)
        new_worker(["echo"])
        states = eventually(lambda: _states(qf, ids), timeout=300, interval=1.0)
        assert states == ["succeeded"] * 500
        assert [qf.result(i)["text"] for i in ids[:5]] == ["0", "1", "2", "3", "4"]


def _batch(qf: Client, batch_id: str) -> dict[str, Any] | None:
    try:
        b = qf.batch(batch_id)
    except Exception:  # the API answers 503 while Redis is down
        return None
    return b if b["status"] in ("completed", "failed", "cancelled", "expired") else None


def _states(qf: Client, ids: list[str]) -> list[str] | None:
    try:
        states = [qf.job(i)["state"] for i in ids]
    except Exception:
        return None
    return states if all(s in ("succeeded", "failed") for s in states) else None
