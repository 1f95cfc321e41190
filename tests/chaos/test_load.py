"""20,000 jobs from 50 concurrent clients over HTTP: every one accepted is finished, none lost."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import redis

from queueformer.cluster import Cluster
from queueformer.state import job_key
from tests.helpers import eventually

CLIENTS, PER_CLIENT = 50, 400


def test_twenty_thousand_jobs_from_fifty_clients_none_lost(chaos_cluster: tuple[Cluster, Any]) -> None:
    cluster, new_worker = chaos_cluster
    new_worker(["echo"])
    accepted: list[list[str]] = [[] for _ in range(CLIENTS)]
    errors: list[str] = []

    def client(n: int) -> None:
        with httpx.Client(base_url=cluster.api_url, timeout=60) as http:
            for i in range(PER_CLIENT):
                resp = http.post("/v1/jobs", json={"task": "echo", "model": "echo", "text": f"{n}:{i}"})
                if resp.status_code == 202:
                    accepted[n].append(resp.json()["id"])
                else:
                    errors.append(f"{resp.status_code} {resp.text[:200]}")

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    submitted_s = time.monotonic() - started
    ids = [i for per in accepted for i in per]
    assert errors == [] and len(ids) == CLIENTS * PER_CLIENT == len(set(ids))
    assert cluster.settings.redis_url is not None
    r = redis.Redis.from_url(cluster.settings.redis_url.get_secret_value(), decode_responses=True)

    def states() -> dict[str, int] | None:
        p = r.pipeline(transaction=False)
        for job_id in ids:
            p.hget(job_key(job_id), "state")
        counts: dict[str, int] = {}
        for s in p.execute():
            counts[str(s)] = counts.get(str(s), 0) + 1
        return counts if counts.get("queued", 0) + counts.get("running", 0) == 0 else None

    counts = eventually(states, timeout=600, interval=1.0)
    total_s = time.monotonic() - started
    assert counts == {"succeeded": CLIENTS * PER_CLIENT}
    print(f"{len(ids)} jobs from {CLIENTS} clients: accepted in {submitted_s:.1f}s, all finished in {total_s:.1f}s")
