"""A message popped by a consumer that dies before recording it: the work still finishes, once."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import redis

from queueformer.client import Client
from queueformer.server.cluster import Cluster
from queueformer.server.reconcile import unit_of
from tests.chaos.test_worker_kills import batch_lines
from tests.helpers import jsonl, pop


def test_jobs_and_batch_lines_whose_messages_were_lost_still_finish(chaos_cluster: tuple[Cluster, Any]) -> None:
    cluster, new_worker = chaos_cluster
    assert cluster.settings.redis_url is not None
    r = redis.Redis.from_url(cluster.settings.redis_url.get_secret_value(), decode_responses=True)
    with Client(cluster.api_url) as qf:
        batch = qf.create_batch(qf.upload(jsonl(batch_lines(40, 8)))["id"], "/v1/jobs")
        jobs = [
            {"task": "generate", "model": "tiny-gpt2", "prompt": f"lost {i}", "max_new_tokens": 8} for i in range(5)
        ]
        ids = qf.submit_many(jobs)
        # Every message is popped the way kombu's consumer pops it, and never recorded as unacknowledged.
        lost = []
        while (raw := pop(r, "tiny-gpt2")) is not None:
            lost.append(unit_of(json.loads(raw)))
        assert {u["kind"] for u in lost if u} == {"lines", "jobs"}
        started = time.monotonic()
        new_worker(["tiny-gpt2"])
        done = qf.wait_batch(batch["id"], timeout=120, poll_s=0.5)
        assert done["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
        out, err = qf.batch_results(done)
        assert err == [] and sorted(o["custom_id"] for o in out) == sorted(f"line-{i}" for i in range(40))
        records = [qf.wait(i, timeout=120) for i in ids]
        assert [rec["state"] for rec in records] == ["succeeded"] * 5
        assert all(rec["attempts"] == 1 for rec in records)  # sent again, run once
        elapsed = time.monotonic() - started
        metrics = httpx.get(f"{cluster.api_url}/metrics").text
    resent = {
        line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("queueformer_resent_total{")
    }
    assert resent == {'kind="job"': 5.0, 'kind="batch_chunk"': float(len([u for u in lost if u["kind"] == "lines"]))}
    print(
        f"{len(lost)} messages lost in delivery (a batch chunk and 5 jobs): re-sent and all finished "
        f"{elapsed:.1f}s after the worker started"
    )
