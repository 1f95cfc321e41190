"""Priorities under a saturating batch: ``python -m bench --only priority``.

A cluster serving tiny-gpt2 (one worker, 8 consumer slots, 64-row engine batches) runs a batch of
long lines (64 new tokens each, EOS ignored) at the batch default priority (2). Small interactive jobs
(8 new tokens) are measured: their queue wait (record ``started_at - created_at``: the message reached a
consumer slot) and latency (``finished_at - created_at``: that plus engine admission and decoding), in
three situations:

* idle — no batch, one job at a time (the floor);
* urgent — under the batch, submitted with ``priority: 9``, one at a time (an interactive user: the
  next request after the previous answer);
* same priority — under the batch, submitted at the batch's own priority (2), one every 0.25 s
  without waiting: what every job got before priorities existed, a place behind every queued chunk
  and every waiting line (one at a time would take a whole batch per job).

Prints a table and writes ``bench/results/priority.json``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from bench.common import CACHE, ROOT, free_port, percentile, save, say, table, wait_until

MODEL = "tiny-gpt2"
JOB = {"task": "generate", "model": MODEL, "prompt": "The cat", "max_new_tokens": 8}


def _batch(qf: Any, lines: int) -> str:
    body = {"task": "generate", "model": MODEL, "prompt": "The weather today", "max_new_tokens": 64, "ignore_eos": True}
    rows = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/jobs", "body": body} for i in range(lines)]
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    batch = qf.create_batch(qf.upload(data)["id"], "/v1/jobs")
    batch_id = str(batch["id"])
    wait_until(lambda: qf.batch(batch_id)["request_counts"]["completed"] > 0, timeout=300)
    return batch_id


def _jobs(qf: Any, n: int, priority: int | None, every_s: float = 0.25, one_at_a_time: bool = True) -> dict[str, Any]:
    body = {**JOB, **({"priority": priority} if priority is not None else {})}
    ids, records = [], []
    for _ in range(n):
        ids.append(qf.submit(body))
        if one_at_a_time:
            records.append(qf.wait(ids[-1], timeout=1800))
        time.sleep(every_s)
    records = records or [qf.wait(i, timeout=1800) for i in ids]
    assert all(r["state"] == "succeeded" for r in records), [r["state"] for r in records]
    waits = [r["started_at"] - r["created_at"] for r in records]
    latencies = [r["finished_at"] - r["created_at"] for r in records]
    return {
        "jobs": n,
        "wait_p50_s": percentile(waits, 0.5),
        "wait_p99_s": percentile(waits, 0.99),
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p99_s": percentile(latencies, 0.99),
    }


def _under_batch(qf: Any, lines: int, n: int, priority: int, one_at_a_time: bool) -> dict[str, Any]:
    batch_id = _batch(qf, lines)
    started = qf.batch(batch_id)
    result = _jobs(qf, n, priority, one_at_a_time=one_at_a_time)
    now = qf.batch(batch_id)
    result["batch_lines_done_meanwhile"] = now["request_counts"]["completed"] - started["request_counts"]["completed"]
    result["batch_status_after"] = now["status"]
    qf.cancel_batch(batch_id)
    qf.wait_batch(batch_id, timeout=600)
    return result


def run(quick: bool = False) -> dict[str, Any]:
    from queueformer.client import Client
    from queueformer.contract.settings import load_settings
    from queueformer.server.cluster import Cluster

    models = ROOT.parent / ".queueformer" / "models"
    if not (models / MODEL).is_dir():
        raise SystemExit(f"{models / MODEL} is missing: build the tiny models first (make setup)")
    lines, n = (1000, 6) if quick else (3000, 12)
    settings = load_settings(
        data_dir=CACHE / "priority",
        storage_url=f"file://{CACHE / 'priority' / 'storage'}",
        models_dir=models,
        redis_url=None,
        registry="tiny",
        quota={"max_enqueued_tokens": 10**9},
    )
    cluster = Cluster(settings, api_port=free_port(), worker_groups=[[MODEL]], worker_concurrency=8)
    with cluster.running(timeout=240), Client(cluster.api_url, timeout=60) as qf:
        # Warm-up: the first decode steps of a fresh process are slow.
        _jobs(qf, 4, None, every_s=0.05, one_at_a_time=False)
        idle = _jobs(qf, n, None)
        say(f"  idle: latency p50 {idle['latency_p50_s']:.3f}s")
        urgent = _under_batch(qf, lines, n, priority=9, one_at_a_time=True)
        say(f"  urgent under a batch: latency p50 {urgent['latency_p50_s']:.3f}s")
        same = _under_batch(qf, lines, n, priority=2, one_at_a_time=False)
        say(f"  same priority as the batch: latency p50 {same['latency_p50_s']:.3f}s")
    rows = [
        (
            name,
            r["wait_p50_s"],
            r["wait_p99_s"],
            r["latency_p50_s"],
            r["latency_p99_s"],
            r.get("batch_status_after", ""),
        )
        for name, r in (
            ("idle, one at a time", idle),
            ("urgent (9) under batch, one at a time", urgent),
            ("same priority (2) under batch, every 0.25 s", same),
        )
    ]
    say(
        table(
            f"interactive jobs ({n} each, 8 new tokens) under a {lines:,}-line batch (64 tokens a line)",
            ["situation", "wait p50 s", "wait p99 s", "latency p50 s", "latency p99 s", "batch after"],
            rows,
        )
    )
    ratio = same["latency_p50_s"] / urgent["latency_p50_s"]
    say(f"  same-priority / urgent latency p50: {ratio:.1f}x")
    results = {
        "load_average_1m_at_end": os.getloadavg()[0],  # this host is shared: the figures move with it
        "batch_lines": lines,
        "jobs": n,
        "idle": idle,
        "urgent": urgent,
        "same_priority": same,
        "latency_p50_ratio_same_over_urgent": ratio,
    }
    say(f"saved {save('priority', results)}")
    return results


if __name__ == "__main__":
    run()
