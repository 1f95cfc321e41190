"""Queue overhead: no-op jobs through the API vs raw Celery, submit latency, and batch intake.

* raw Celery — one message per job (``apply_async`` in a loop) to a threads-pool worker running a
  no-op task; time until every task has run;
* through the API — the same number of ``echo`` jobs submitted with ``POST /v1/jobs/bulk`` (the API
  records them in one pipelined round trip and packs 128 per message); time until every job record
  says ``succeeded`` and its result is in storage;
* single-job submit latency (``POST /v1/jobs``), p50 and p99;
* seconds to validate and enqueue a 50,000-line batch file (``POST /v1/batches``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from bench.common import CACHE, ROOT, free_port, percentile, save, say, table, wait_until


def raw_celery(url: str, n: int) -> float:
    import redis

    env = {**os.environ, "QUEUEFORMER_REDIS_URL": url, "PYTHONPATH": str(ROOT.parent)}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.noop_celery",
            "worker",
            "-P",
            "threads",
            "-c",
            "8",
            "-Q",
            "bench-noop",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "WARNING",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        os.environ["QUEUEFORMER_REDIS_URL"] = url
        from bench.noop_celery import noop

        client = redis.Redis.from_url(url)
        client.delete("bench:noop:done")
        noop.delay(-1)  # wait for the worker to be up before timing
        wait_until(lambda: int(client.get("bench:noop:done") or 0) >= 1, 60, interval=0.01)
        client.delete("bench:noop:done")
        started = time.perf_counter()
        for i in range(n):
            noop.apply_async((i,))
        wait_until(lambda: int(client.get("bench:noop:done") or 0) >= n, 300, interval=0.01)
        return n / (time.perf_counter() - started)
    finally:
        worker.terminate()
        worker.wait(30)


def through_api(api: str, url: str, n: int) -> float:
    import redis

    from queueformer.client import Client
    from queueformer.server import keys

    client = redis.Redis.from_url(url, decode_responses=True)
    with Client(api, timeout=120) as qf:
        qf.wait(qf.submit({"task": "echo", "model": "echo", "text": "warm"}), timeout=60)
        started = time.perf_counter()
        ids = qf.submit_many([{"task": "echo", "model": "echo", "text": str(i)} for i in range(n)], chunk=1000)

        def done() -> bool:
            p = client.pipeline(transaction=False)
            for job_id in ids:
                p.hget(keys.job(job_id), "state")
            return all(state == "succeeded" for state in p.execute())

        wait_until(done, 300, interval=0.05)
        return n / (time.perf_counter() - started)


def submit_latency(api: str, n: int) -> dict[str, float]:
    import httpx

    samples = []
    with httpx.Client(base_url=api, timeout=30) as http:
        for i in range(n):
            started = time.perf_counter()
            resp = http.post("/v1/jobs", json={"task": "echo", "model": "echo", "text": str(i)})
            samples.append((time.perf_counter() - started) * 1000)
            assert resp.status_code == 202, resp.text
    return {"p50_ms": percentile(samples, 0.5), "p99_ms": percentile(samples, 0.99)}


def batch_intake(api: str, n: int) -> dict[str, float]:
    from queueformer.client import Client

    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "model": "tiny-gpt2",
                "prompt": f"The weather today number {i}",
                "max_tokens": 16,
                "temperature": 0,
            },
        }
        for i in range(n)
    ]
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    with Client(api, timeout=300) as qf:
        started = time.perf_counter()
        file = qf.upload(data)
        uploaded = time.perf_counter() - started
        started = time.perf_counter()
        batch = qf.create_batch(file["id"], "/v1/completions")
        created = time.perf_counter() - started
        assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == n, batch
        qf.cancel_batch(batch["id"])  # nothing serves tiny-gpt2 here; close the lines out
    return {"lines": n, "bytes": len(data), "upload_s": uploaded, "validate_and_enqueue_s": created}


def run(quick: bool = False) -> dict[str, Any]:
    from queueformer.contract.settings import load_settings
    from queueformer.server.cluster import Cluster

    n = 500 if quick else 4000
    settings = load_settings(
        data_dir=CACHE / "queue",
        storage_url=f"file://{CACHE / 'queue' / 'storage'}",
        redis_url=None,
        registry="tiny",
        quota={"max_enqueued_tokens": 10**9},
    )
    cluster = Cluster(settings, api_port=free_port(), worker_groups=[["echo"]], worker_concurrency=8)
    with cluster.running(timeout=180):
        assert cluster.redis is not None
        url = cluster.redis.url
        raw = raw_celery(url, n)
        say(f"  raw Celery, one message per job: {raw:,.0f} jobs/s")
        api = through_api(cluster.api_url, url, n)
        say(f"  through the API (bulk submit): {api:,.0f} jobs/s")
        latency = submit_latency(cluster.api_url, 100 if quick else 500)
        intake = batch_intake(cluster.api_url, 5000 if quick else 50_000)
    ratio = api / raw
    rows = [
        ("no-op jobs/s, raw Celery (one message per job)", raw, ""),
        ("no-op jobs/s, through the API", api, ""),
        ("API / raw Celery", ratio, ">= 1.5"),
        ("submit latency p50 (ms)", latency["p50_ms"], ""),
        ("submit latency p99 (ms)", latency["p99_ms"], ""),
        (f"{intake['lines']:,}-line batch: validate + enqueue (s)", intake["validate_and_enqueue_s"], "<= 5"),
        (f"{intake['lines']:,}-line batch: upload (s)", intake["upload_s"], ""),
    ]
    say(table(f"queue overhead ({n} jobs)", ["measure", "value", "target"], rows))
    results = {
        "jobs": n,
        "raw_celery_jobs_s": raw,
        "api_jobs_s": api,
        "ratio": ratio,
        "submit_latency": latency,
        "batch_intake": intake,
    }
    say(f"saved {save('queue_overhead', results)}")
    return results
