"""20,000 jobs from 50 concurrent clients over HTTP: every one accepted is finished once, none lost.

Each client interleaves single submissions (``POST /v1/jobs``: one job, one broker message) with bulk
ones (``POST /v1/jobs/bulk``), while two echo workers consume. One job per request for all 20,000 is
the heavier shape but took 4 to 5.5 minutes here: on a 2-core machine one worker's Celery consumer
moves about 80 to 100 messages a second (see docs/reliability.md).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import redis

from queueformer.server import keys
from queueformer.server.cluster import Cluster
from queueformer.server.storage import Storage
from tests.helpers import eventually

CLIENTS, PER_CLIENT = 50, 400
SINGLES, BULK = 5, 15  # per round of 20 jobs: 5 single requests, then one bulk request of 15
WORKERS = 2


def test_twenty_thousand_jobs_from_fifty_clients_none_lost(chaos_cluster: tuple[Cluster, Any]) -> None:
    cluster, new_worker = chaos_cluster
    for _ in range(WORKERS):
        new_worker(["echo"])
    accepted: list[dict[str, str]] = [{} for _ in range(CLIENTS)]  # job id -> the text it was sent
    errors: list[str] = []
    requests = [0] * CLIENTS

    def client(n: int) -> None:
        with httpx.Client(base_url=cluster.api_url, timeout=60) as http:
            for start in range(0, PER_CLIENT, SINGLES + BULK):
                texts = [f"{n}:{i}" for i in range(start, start + SINGLES + BULK)]
                for text in texts[:SINGLES]:
                    resp = http.post("/v1/jobs", json={"task": "echo", "model": "echo", "text": text})
                    requests[n] += 1
                    if resp.status_code == 202:
                        accepted[n][resp.json()["id"]] = text
                    else:
                        errors.append(f"{resp.status_code} {resp.text[:200]}")
                jobs = [{"task": "echo", "model": "echo", "text": t} for t in texts[SINGLES:]]
                resp = http.post("/v1/jobs/bulk", json={"jobs": jobs})
                requests[n] += 1
                if resp.status_code == 202:
                    accepted[n].update(zip((d["id"] for d in resp.json()["data"]), texts[SINGLES:], strict=True))
                else:
                    errors.append(f"{resp.status_code} {resp.text[:200]}")

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    submitted_s = time.monotonic() - started
    sent = {job_id: text for per in accepted for job_id, text in per.items()}
    ids = list(sent)
    assert errors == [] and len(ids) == CLIENTS * PER_CLIENT  # every job accepted, each with its own id
    assert cluster.settings.redis_url is not None
    r = redis.Redis.from_url(cluster.settings.redis_url.get_secret_value(), decode_responses=True)

    def states() -> dict[str, int] | None:
        p = r.pipeline(transaction=False)
        for job_id in ids:
            p.hget(keys.job(job_id), "state")
        counts: dict[str, int] = {}
        for s in p.execute():
            counts[str(s)] = counts.get(str(s), 0) + 1
        return counts if counts.get("queued", 0) + counts.get("running", 0) == 0 else None

    counts = eventually(states, timeout=600, interval=1.0)
    total_s = time.monotonic() - started
    assert counts == {"succeeded": CLIENTS * PER_CLIENT}  # lost = 0
    p = r.pipeline(transaction=False)
    for job_id in ids:
        p.hget(keys.job(job_id), "attempts")
    duplicated = sum(int(attempts) > 1 for attempts in p.execute())
    assert duplicated == 0  # each job ran once
    storage = Storage(cluster.settings.resolved_storage_url)
    wrong = [i for i in ids if storage.get_json(storage.result_key(i))["text"] != sent[i]]
    assert wrong == []  # and each result is its own job's
    print(
        f"{len(ids)} jobs in {sum(requests)} requests from {CLIENTS} clients, {WORKERS} echo workers: "
        f"accepted in {submitted_s:.1f}s ({len(ids) / submitted_s:.0f} jobs/s, {sum(requests) / submitted_s:.0f} "
        f"requests/s), all finished in {total_s:.1f}s ({len(ids) / total_s:.0f} jobs/s); lost 0, duplicated 0"
    )
