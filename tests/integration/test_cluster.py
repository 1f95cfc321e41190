"""A real cluster: uvicorn API and a Celery worker in subprocesses, a real Redis, the tiny models.

Covers the foundation's end-to-end path (a generate job over HTTP lands in storage), streaming, the
OpenAI SDK against the batch API, mixed job types in one batch and a 10,000-line batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from queueformer.client import Client
from queueformer.server.cluster import Cluster
from queueformer.server.storage import Storage
from tests.conftest import free_port
from tests.helpers import eventually, jsonl, make_settings


@pytest.fixture(scope="module")
def cluster(module_redis_url: str, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    c = Cluster(make_settings(module_redis_url, tmp, tiny_models), api_port=free_port(), worker_concurrency=8)
    with c.running(timeout=240):
        yield c


@pytest.fixture
def qf(cluster: Cluster) -> Iterator[Client]:
    with Client(cluster.api_url) as client:
        yield client


def test_generate_job_over_http_finishes_with_its_result_in_storage(cluster: Cluster, qf: Client) -> None:
    job_id = qf.submit({"task": "generate", "model": "tiny-gpt2", "prompt": "The weather today", "max_new_tokens": 12})
    record = qf.wait(job_id, timeout=60)
    assert record["state"] == "succeeded", record
    assert record["result_url"] == f"/v1/jobs/{job_id}/result" and "result_uri" not in record
    storage = Storage(cluster.settings.resolved_storage_url)
    stored = storage.get_json(storage.result_key(job_id))
    assert stored == qf.result(job_id)
    gen = stored["generations"][0]
    assert gen["text"].startswith(" is sunny") and stored["usage"]["completion_tokens"] == len(gen["token_ids"])


def test_tokens_stream_over_server_sent_events(qf: Client) -> None:
    job_id = qf.submit(
        {"task": "generate", "model": "tiny-gpt2", "prompt": "The cat", "max_new_tokens": 10, "stream": True}
    )
    events = list(qf.events(job_id))
    kinds = [k for k, _ in events]
    assert kinds[0] == "state" and "token" in kinds and events[-1] == ("state", events[-1][1])
    assert events[-1][1]["state"] == "succeeded"
    streamed = "".join(d["text"] for k, d in events if k == "token")
    assert streamed == qf.result(job_id)["generations"][0]["text"]


def test_models_endpoint_reports_what_workers_loaded(qf: Client) -> None:
    models = {m["id"]: m for m in qf.models()}
    gpt2 = models["tiny-gpt2"]
    assert gpt2["queue"] == "tiny-gpt2" and gpt2["quantization"] == "none"
    (worker,) = gpt2["workers"]
    assert worker["ready"] and worker["device_map"] == {"": "cpu"} and worker["dtype"] == "float32"
    assert worker["memory_bytes"] > 0
    assert worker["slots"] == 8  # the worker's --concurrency: the API sizes batch chunks from it


def test_openai_sdk_runs_a_batch_end_to_end(cluster: Cluster, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=f"{cluster.api_url}/v1", api_key="unused-locally")
    prompts = ["The weather today", "A queue holds", "The cat sleeps"]
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "tiny-gpt2", "prompt": p, "max_tokens": 8, "temperature": 0},
        }
        for i, p in enumerate(prompts)
    ]
    path = tmp_path / "batch.jsonl"
    path.write_bytes(jsonl(lines))
    file = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/completions", completion_window="24h", metadata={"run": "sdk"}
    )
    deadline = time.monotonic() + 60
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.3)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == 3 and batch.request_counts.failed == 0
    assert batch.metadata == {"run": "sdk"} and batch.output_file_id and batch.completed_at
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == ["c0", "c1", "c2"]
    by_id = {o["custom_id"]: o for o in out}
    body = by_id["c0"]["response"]["body"]
    assert by_id["c0"]["response"]["status_code"] == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"].startswith(" is sunny") and body["usage"]["completion_tokens"] > 0
    listed = client.batches.list(limit=5)
    assert batch.id in [b.id for b in listed.data]


def test_chat_completions_use_the_chat_template(qf: Client) -> None:
    line = {
        "custom_id": "chat",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "tiny-gpt2",
            "messages": [{"role": "user", "content": "The weather today"}],
            "max_tokens": 6,
            "temperature": 0,
        },
    }
    batch = qf.wait_batch(qf.create_batch(qf.upload(jsonl([line]))["id"], "/v1/chat/completions")["id"], timeout=60)
    out, err = qf.batch_results(batch)
    assert err == [] and out[0]["response"]["body"]["object"] == "chat.completion"
    assert out[0]["response"]["body"]["choices"][0]["message"]["role"] == "assistant"


def test_one_batch_can_mix_every_inference_type(qf: Client) -> None:
    bodies = [
        {"task": "generate", "model": "tiny-gpt2", "prompt": "A queue holds", "max_new_tokens": 6},
        {"task": "fill-mask", "model": "tiny-bert", "text": "The cat sleeps on the warm [MASK].", "top_k": 2},
        {"task": "translate", "model": "tiny-marian-en-de", "text": "the weather is good"},
        {
            "task": "classify",
            "model": "tiny-sentiment",
            "text": ["I love this film", "The food was cold and the service was rude."],
        },
        {"task": "echo", "model": "echo", "text": "ping"},
        {"task": "fill-mask", "model": "tiny-bert", "text": "no mask here"},
    ]
    lines = [{"custom_id": f"j{i}", "method": "POST", "url": "/v1/jobs", "body": b} for i, b in enumerate(bodies)]
    batch = qf.wait_batch(qf.create_batch(qf.upload(jsonl(lines))["id"], "/v1/jobs")["id"], timeout=60)
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 6, "completed": 5, "failed": 1}
    out, err = qf.batch_results(batch)
    res = {o["custom_id"]: o["response"]["body"] for o in out}
    assert res["j0"]["task"] == "generate"
    assert len(res["j1"]["masks"]) == 1 and len(res["j1"]["masks"][0]) == 2
    assert res["j2"]["translation"]["text"] == "das wetter ist gut"
    assert [lbl[0]["label"] for lbl in res["j3"]["labels"]] == ["POSITIVE", "NEGATIVE"]
    assert res["j4"]["text"] == "ping"
    (bad,) = err
    assert bad["custom_id"] == "j5" and bad["response"]["status_code"] == 422
    assert bad["response"]["body"]["error"]["code"] == "no_mask_token"


def test_ten_thousand_line_batch_completes_with_every_custom_id_once(qf: Client) -> None:
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/jobs",
            "body": {"task": "generate", "model": "tiny-gpt2", "prompt": f"The weather {i}", "max_new_tokens": 2},
        }
        for i in range(10_000)
    ]
    started = time.perf_counter()
    batch = qf.create_batch(qf.upload(jsonl(lines))["id"], "/v1/jobs")
    created = time.perf_counter() - started
    batch = qf.wait_batch(batch["id"], timeout=600, poll_s=1.0)
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 10_000, "completed": 10_000, "failed": 0}
    out, err = qf.batch_results(batch)
    ids = [o["custom_id"] for o in out]
    assert err == [] and len(ids) == 10_000 and set(ids) == {f"req-{i}" for i in range(10_000)}
    print(f"10k batch: created in {created:.2f}s, finished in {time.perf_counter() - started:.1f}s")


def test_partial_output_is_downloadable_while_running(qf: Client, cluster: Cluster) -> None:
    lines = [
        {
            "custom_id": f"p{i}",
            "method": "POST",
            "url": "/v1/jobs",
            "body": {"task": "generate", "model": "tiny-gpt2", "prompt": "x", "max_new_tokens": 64, "ignore_eos": True},
        }
        for i in range(400)
    ]
    batch = qf.create_batch(qf.upload(jsonl(lines))["id"], "/v1/jobs")
    seen = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        current = qf.batch(batch["id"])
        partial = httpx.get(f"{cluster.api_url}/v1/batches/{batch['id']}/output").content.splitlines()
        if current["status"] == "in_progress" and 0 < len(partial) < 400:
            seen = len(partial)
            break
        if current["status"] == "completed":
            break
        time.sleep(0.05)
    final = qf.wait_batch(batch["id"], timeout=120)
    assert final["status"] == "completed"
    assert seen > 0, "never caught the batch part-way through"


def test_fine_tune_then_generate_with_the_new_model_through_the_api(cluster: Cluster, qf: Client) -> None:
    sentence = "The quick brown fox jumps over the lazy dog near the river bank today."
    client = openai.OpenAI(base_url=f"{cluster.api_url}/v1", api_key="unused-locally")
    training = client.files.create(file=("fox.jsonl", jsonl([{"text": sentence}] * 40)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-gpt2",
        training_file=training.id,
        suffix="fox",
        seed=7,
        hyperparameters={"n_epochs": "auto"},
        extra_body={
            "method": "full",
            "hyperparameters": {"max_steps": 60, "learning_rate": 3e-3, "block_size": 32, "checkpoint_steps": 20},
        },
    )
    assert job.status in ("queued", "running") and job.model == "tiny-gpt2"
    done = eventually(
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j,
        timeout=240,
        interval=1,
    )
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny-gpt2:fox:{job.id.split('-', 1)[1][:12].lower()}"
    assert done.trained_tokens == qf.result(job.id)["trained_tokens"] > 0
    assert client.fine_tuning.jobs.list().data[0].id == job.id
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [60, 40, 20]
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-60"
    assert done.training_file == training.id and "model_uri" not in qf.result(job.id)
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert any(e.type == "metrics" for e in events) and events[0].message.startswith("Job is succeeded")

    models = {m["id"]: m for m in qf.models()}
    assert models[done.fine_tuned_model]["queue"] == "fine-tuned"
    gen = qf.submit(
        {"task": "generate", "model": done.fine_tuned_model, "prompt": "The quick brown", "max_new_tokens": 24}
    )
    record = qf.wait(gen, timeout=120)
    assert record["state"] == "succeeded", record
    assert qf.result(gen)["generations"][0]["text"].startswith(" fox jumps over the lazy dog near the river")
