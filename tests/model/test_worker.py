"""A real Celery worker (threads pool, in this process so the model can be made to fail) behind the API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from celery.contrib.testing.worker import start_worker
from fastapi.testclient import TestClient

from api.app import create_app
from queueformer.contract.registry import Registry
from queueformer.server.batches import Batches
from queueformer.server.broker import make_celery
from queueformer.server.files import FileStore
from queueformer.server.jobs import JobStore
from queueformer.server.storage import Storage
from tests.helpers import eventually, make_settings
from workers.holder import ModelHolder, Served, serve
from workers.lease import LeaseKeeper
from workers.lines import LineRunner
from workers.runner import Runner
from workers.tasks import register
from workers.watch import CancelWatcher


@pytest.fixture
def stack(redis_url: str, tiny_models: Path, tmp_path: Path) -> Iterator[tuple[TestClient, Served]]:
    settings = make_settings(redis_url, tmp_path, tiny_models)
    registry = Registry.load("tiny")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    storage = Storage(settings.resolved_storage_url)
    holder = ModelHolder()
    served = serve(registry.get("tiny-gpt2"), tiny_models)
    holder.add(served)
    jobs = JobStore(client)
    watcher = CancelWatcher(jobs.cancel_requested)
    lines = LineRunner(Batches(client, storage, FileStore(client, storage)), storage, watcher, 3)
    runner = Runner(holder, jobs, storage, watcher=watcher, lines=lines)
    app = make_celery(settings, registry)
    register(app, runner, LeaseKeeper(client, settings.visibility_timeout_s))
    with (
        start_worker(app, pool="threads", concurrency=4, perform_ping_check=False, queues=["tiny-gpt2"]),
        TestClient(create_app(settings)) as api,
    ):
        yield api, served
    runner.stop()
    holder.stop()


def wait_done(api: TestClient, job_id: str) -> dict[str, Any]:
    return eventually(lambda: (r := api.get(f"/v1/jobs/{job_id}").json())["state"] in ("succeeded", "failed") and r)


def test_a_job_that_runs_out_of_memory_fails_alone_and_the_worker_keeps_serving(
    stack: tuple[TestClient, Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    api, served = stack
    model = served.handler.model
    poison = served.handler.tokenizer("Poison")["input_ids"][0]
    real_forward = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        if ids is not None and bool((ids == poison).any()):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    prompts = ["The weather today", "Poison", "A queue holds"]
    resp = api.post(
        "/v1/jobs/bulk", json={"jobs": [{"task": "generate", "model": "tiny-gpt2", "prompt": p} for p in prompts]}
    )
    ids = [d["id"] for d in resp.json()["data"]]
    records = [wait_done(api, i) for i in ids]
    assert [r["state"] for r in records] == ["succeeded", "failed", "succeeded"]
    assert records[1]["error"]["code"] == "out_of_memory"
    after = api.post("/v1/jobs", json={"task": "generate", "model": "tiny-gpt2", "prompt": "The cat"}).json()["id"]
    assert wait_done(api, after)["state"] == "succeeded"


def test_input_longer_than_the_model_allows(stack: tuple[TestClient, Served]) -> None:
    api, _ = stack
    long_prompt = "The weather today is sunny. " * 60  # well past the tiny model's 256 positions
    job = {"task": "generate", "model": "tiny-gpt2", "prompt": long_prompt, "max_new_tokens": 8}
    failed = wait_done(api, api.post("/v1/jobs", json=job).json()["id"])
    assert failed["state"] == "failed" and failed["error"]["code"] == "input_too_long"
    assert failed["error"]["retryable"] is False and failed["error"]["param"] == "text"
    cut = wait_done(api, api.post("/v1/jobs", json={**job, "truncate": True}).json()["id"])
    assert cut["state"] == "succeeded"
    result = api.get(f"/v1/jobs/{cut['id']}/result").json()
    assert result["usage"]["prompt_tokens"] + 8 <= 256


def test_cancel_stops_a_running_job(stack: tuple[TestClient, Served]) -> None:
    api, _ = stack
    job = {"task": "generate", "model": "tiny-gpt2", "prompt": "x", "max_new_tokens": 250, "ignore_eos": True}
    job_id = api.post("/v1/jobs", json=job).json()["id"]
    eventually(lambda: api.get(f"/v1/jobs/{job_id}").json()["state"] == "running", timeout=10, interval=0.005)
    api.post(f"/v1/jobs/{job_id}/cancel")
    record = eventually(lambda: (r := api.get(f"/v1/jobs/{job_id}").json())["state"] != "running" and r)
    assert record["state"] in ("cancelled", "succeeded")  # a 250-token job may finish before the flag is read
