"""The cluster's one Prometheus view: while a batch runs, the API's ``/metrics`` answers queue wait (jobs and
batch lines), time to first token, tokens/s, batch occupancy, KV-cache use and memory from the workers, and
the batches by status, with no worker port opened."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from queueformer.client import Client
from queueformer.server.cluster import Cluster
from tests.conftest import free_port
from tests.helpers import eventually, jsonl, make_settings


@pytest.fixture(scope="module")
def cluster(module_redis_url: str, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("metrics")
    settings = make_settings(module_redis_url, tmp, tiny_models, quota={"max_enqueued_tokens": 10**9})
    env = {"QUEUEFORMER_WORKER__METRICS_INTERVAL_S": "1"}
    c = Cluster(settings, api_port=free_port(), worker_groups=[["tiny-gpt2"]], worker_concurrency=8, env=env)
    with c.running(timeout=240):
        yield c


def scrape(cluster: Cluster) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    text = httpx.get(f"{cluster.api_url}/metrics", timeout=30).text
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.name, s.labels, s.value))
    return out


def total(samples: dict[str, list[tuple[str, dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for _, lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def test_a_running_batch_shows_in_the_apis_metrics(cluster: Cluster) -> None:
    body = {"task": "generate", "model": "tiny-gpt2", "prompt": "The weather today", "max_new_tokens": 64}
    rows = [
        {"custom_id": f"l{i}", "method": "POST", "url": "/v1/jobs", "body": {**body, "ignore_eos": True}}
        for i in range(2000)
    ]
    with Client(cluster.api_url) as qf:
        batch = qf.create_batch(qf.upload(jsonl(rows))["id"], "/v1/jobs")
        job = qf.submit({"task": "generate", "model": "tiny-gpt2", "prompt": "The cat", "max_new_tokens": 4})
        assert qf.wait(job, timeout=120)["state"] == "succeeded"

        def running() -> dict[str, list[tuple[str, dict[str, str], float]]] | None:
            m = scrape(cluster)
            ready = (
                total(m, "queueformer_tokens_per_second", model="tiny-gpt2") > 0
                and total(m, "queueformer_batch_lines_total", model="tiny-gpt2", outcome="completed") > 0
                and total(m, "queueformer_engine_rows", model="tiny-gpt2") > 0
            )
            return m if ready else None

        m = eventually(running, timeout=180, interval=0.5)
        try:
            wait = "queueformer_job_wait_seconds_count"
            assert total(m, wait, model="tiny-gpt2", kind="job") >= 1
            assert total(m, wait, model="tiny-gpt2", kind="batch_line") > 0
            assert total(m, "queueformer_job_wait_seconds_sum", kind="batch_line") > 0
            assert total(m, "queueformer_time_to_first_token_seconds_count", model="tiny-gpt2") > 0
            assert total(m, "queueformer_tokens_generated_total", model="tiny-gpt2") > 0
            assert 0 < total(m, "queueformer_batch_occupancy_ratio", model="tiny-gpt2") <= 1
            assert total(m, "queueformer_kv_cache_usage_ratio", model="tiny-gpt2") > 0
            assert total(m, "queueformer_model_memory_bytes", model="tiny-gpt2") > 0
            # Process memory of the API and of the worker (the worker's under its own label).
            rss = [(lab.get("worker"), v) for _, lab, v in m["process_resident_memory_bytes"]]
            assert len(rss) == 2 and all(v > 0 for _, v in rss) and {w is None for w, _ in rss} == {True, False}
            assert total(m, "queueformer_batches_open", status="in_progress") == 1
            assert total(m, "queueformer_open_batch_lines", state="total") == 2000
        finally:
            qf.cancel_batch(str(batch["id"]))
        ended = qf.wait_batch(str(batch["id"]), timeout=180)
        assert ended["status"] == "cancelled"
        after = scrape(cluster)
        assert total(after, "queueformer_batches_ended_total", status="cancelled") == 1
        assert total(after, "queueformer_batches_open", status="in_progress") == 0
