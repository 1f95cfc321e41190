"""Fine-tune jobs in-process on the tiny GPT-2: learning, adapters, resume, cancel and bad data.

The training runner, handler, storage and Redis are the real ones a fine-tune worker uses; only the
Celery consumer around them is left out (the cluster and chaos tests cover it).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from queueformer.contract.errors import TransientError
from queueformer.contract.jobs import FineTuneJob, GenerateJob
from queueformer.contract.registry import Registry
from queueformer.contract.units import JobsUnit
from queueformer.server import keys
from queueformer.server.files import FileStore, TrainingData
from queueformer.server.jobs import JobStore
from queueformer.server.overlay import ModelOverlay
from queueformer.server.storage import Storage
from workers.fine_tuned import FineTunedModels
from workers.handlers.fine_tune import FineTuneHandler
from workers.training.runner import TrainingRunner

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today."
PROMPT = "The quick brown"


@dataclass
class Env:
    jobs: JobStore
    storage: Storage
    overlay: ModelOverlay
    runner: TrainingRunner
    registry: Registry
    models_dir: Path
    files: FileStore
    training_file: str

    def submit(self, method: str, job_id: str, tenant: str = "default", **hp: Any) -> str:
        params = {"block_size": 32, "batch_size": 8, "checkpoint_steps": 20, "learning_rate": 3e-3, **hp}
        spec = FineTuneJob(
            model="tiny-gpt2", training_file=self.training_file, method=method, hyperparameters=params, suffix="fox"
        )
        self.jobs.create_many([(job_id, spec)], tenant=tenant, queue={job_id: "fine-tune"})
        return job_id

    def run(self, job_id: str) -> dict[str, Any]:
        self.runner.run(JobsUnit(model="tiny-gpt2", ids=[job_id], task="fine-tune"))
        return self.jobs.raw(job_id)

    def result(self, job_id: str) -> dict[str, Any]:
        data: dict[str, Any] = self.storage.get_json(self.storage.result_key(job_id))
        return data

    def greedy(self, model_name: str, prompt: str = PROMPT, n: int = 24) -> str:
        served = FineTunedModels(self.overlay, self.registry, self.storage, self.models_dir)(model_name)
        try:
            out = served.handler.run([GenerateJob(model=model_name, prompt=prompt, max_new_tokens=n)])
            return str(out[0].model_dump()["generations"][0]["text"])
        finally:
            served.stop()


@pytest.fixture
def env(redis_url: str, tiny_models: Path, tmp_path: Path) -> Iterator[Env]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    storage = Storage(f"file://{tmp_path / 'storage'}")
    files = FileStore(client, storage)
    lines = "".join(json.dumps({"text": SENTENCE}) + "\n" for _ in range(40))
    training = files.create_bytes("default", "fox.jsonl", "fine-tune", lines.encode()).id
    registry = Registry.load("tiny")
    jobs, overlay = JobStore(client), ModelOverlay(client, storage, registry.fine_tune.serve_queue)
    allowed = TrainingData(files, [f"{storage.url}/shared/"])
    handler = FineTuneHandler(registry, tiny_models, storage, jobs, overlay, tmp_path / "work", allowed)
    runner = TrainingRunner(handler, jobs, storage)
    yield Env(jobs, storage, overlay, runner, registry, tiny_models, files, training)
    client.close()


def test_full_fine_tune_learns_a_repeated_sentence_and_serves_it(env: Env) -> None:
    job = env.submit("full", "job-fulltune0001", max_steps=60, eval_split=0.1)
    record = env.run(job)
    assert record["state"] == "succeeded", record.get("error")
    result = env.result(job)
    assert result["fine_tuned_model"] == "ft:tiny-gpt2:fox:fulltune0001"
    assert result["steps"] == 60 and result["checkpoints"] == [20, 40, 60] and result["resumed_from_step"] is None
    assert result["eval_loss"] < 0.05 and result["perplexity"] < 1.06
    entry = env.overlay.get(result["fine_tuned_model"])
    assert entry is not None and entry.queue == "fine-tuned" and not entry.adapter and entry.tenant == "default"
    assert env.greedy(result["fine_tuned_model"]).startswith(" fox jumps over the lazy dog near the river")
    progress = json.loads(record["progress"])
    assert progress["step"] == 60 and progress["loss"] < 0.1


def test_lora_adapter_saves_alone_and_loads_merged_equal_to_peft(env: Env, tiny_models: Path) -> None:
    from peft import PeftModel

    job = env.submit("lora", "job-loratune0001", max_steps=60, learning_rate=2e-2)
    assert env.run(job)["state"] == "succeeded"
    result = env.result(job)
    entry = env.overlay.get(result["fine_tuned_model"])
    assert entry is not None and entry.path is not None and "model_uri" not in result
    files = set(env.storage.manifest(env.storage.key_of(entry.path))["files"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    served_text = env.greedy(result["fine_tuned_model"])
    assert served_text.startswith(" fox jumps over the lazy dog")
    # Plain transformers + peft, unmerged, from the uploaded adapter: the served (merged) model agrees.
    local = tiny_models / ".fine-tuned" / "ftm-loratune0001"
    base = AutoModelForCausalLM.from_pretrained(tiny_models / "tiny-gpt2", dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, str(local)).eval()
    tok = AutoTokenizer.from_pretrained(local)
    ids = tok(PROMPT, return_tensors="pt")
    out = ref.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    assert tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True) == served_text


def test_qlora_trains_an_adapter_over_a_4bit_base(env: Env) -> None:
    job = env.submit("qlora", "job-qloratune001", max_steps=40, learning_rate=2e-2)
    record = env.run(job)
    assert record["state"] == "succeeded", record.get("error")
    result = env.result(job)
    assert result["method"] == "qlora" and env.overlay.get(result["fine_tuned_model"]).adapter  # type: ignore[union-attr]
    assert env.greedy(result["fine_tuned_model"]).startswith(" fox jumps over")


class DrainAfter:
    """Stands in for the worker's shutdown event: set once ``steps`` optimizer steps have run."""

    def __init__(self, steps: int) -> None:
        self.calls, self.steps = 0, steps

    def is_set(self) -> bool:
        self.calls += 1  # the stop check runs once per optimizer step
        return self.calls >= self.steps


def test_a_drained_run_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_run_ends(env: Env) -> None:
    hp = {"max_steps": 30, "checkpoint_steps": 10, "learning_rate": 1e-3}
    straight = env.submit("full", "job-straight0001", **hp)
    assert env.run(straight)["state"] == "succeeded"

    resumed = env.submit("full", "job-resumed00001", **hp)
    env.runner.draining = DrainAfter(17)  # type: ignore[assignment]
    with pytest.raises(TransientError):
        env.run(resumed)
    record = env.jobs.raw(resumed)
    assert record["state"] == "queued" and record["attempts"] == "0"  # a drain hands the attempt back
    assert env.storage.list("checkpoints/job-resumed00001")[-1].endswith("step-000000017")

    env.runner.draining = threading.Event()
    assert env.run(resumed)["state"] == "succeeded"
    result = env.result(resumed)
    assert result["resumed_from_step"] == 17 and result["steps"] == 30

    a = load_file(str(Path(env.storage.root) / "models/ftm-straight0001/model.safetensors"))
    b = load_file(str(Path(env.storage.root) / "models/ftm-resumed00001/model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst  # the stated tolerance: same weights up to float rounding
    assert abs(env.result(straight)["train_loss"] - result["train_loss"]) < 1e-4


def test_cancel_stops_at_the_next_step_and_keeps_a_checkpoint(env: Env) -> None:
    job = env.submit("lora", "job-cancelled001", max_steps=500)
    env.jobs.r.hset(keys.job(job), "cancel_requested", "1")  # as POST .../cancel does for a running job
    record = env.run(job)
    assert record["state"] == "cancelled"
    error = json.loads(record["error"])
    assert error["code"] == "cancelled" and "step 1" in error["message"]
    assert env.storage.list("checkpoints/job-cancelled001") == ["checkpoints/job-cancelled001/step-000000001"]


def test_bad_training_lines_fail_the_job_with_their_line_numbers(env: Env) -> None:
    huge_int = b'{"text": "x", "n": ' + b"9" * 5000 + b"}"  # past Python's integer conversion limit
    deep = b"[" * 10_000 + b"]" * 10_000  # past the parser's recursion limit
    bad = b'{"text": "fine"}\nnot json\n{"prompt": 3}\n' + huge_int + b"\n" + deep + b"\n"
    env.training_file = env.files.create_bytes("default", "bad.jsonl", "fine-tune", bad).id
    record = env.run(env.submit("full", "job-badtraining1", max_steps=5))
    assert record["state"] == "failed"
    error = json.loads(record["error"])
    assert error["code"] == "invalid_input" and error["param"] == "training_file", error
    for number in (2, 3, 4, 5):
        assert f"line {number}:" in error["message"], error["message"]
    assert "line 5: nested too deeply" in error["message"]


def test_the_worker_trains_only_on_the_jobs_own_tenants_files(env: Env) -> None:
    """A job record naming another tenant's file (written straight into Redis, past the API) never reads it."""
    bad = b'{"text": "private"}\nnot json\n'
    private = env.files.create_bytes("default", "private.jsonl", "fine-tune", bad).id
    env.training_file = private
    foreign = json.loads(env.run(env.submit("full", "job-foreignfile1", tenant="globex", max_steps=2))["error"])
    env.training_file = "file-0123456789abcdef0123456789abcdef"
    missing = json.loads(env.run(env.submit("full", "job-missingfile1", tenant="globex", max_steps=2))["error"])
    # The same answer as for a file that does not exist: nothing about the object, not its bad lines.
    assert foreign["code"] == missing["code"] == "not_found" and foreign["param"] == "training_file"
    assert foreign["message"].replace(private, "X") == missing["message"].replace(env.training_file, "X")
    assert "line" not in foreign["message"]
    # Its owner gets the line numbers.
    env.training_file = private
    own = json.loads(env.run(env.submit("full", "job-ownbadfile01", max_steps=2))["error"])
    assert own["code"] == "invalid_input" and "line 2" in own["message"]
    # Jobs queued by an older version hold the file's resolved URI: still only its owner's file.
    env.training_file = env.storage.uri(env.storage.file_key(private))
    legacy = json.loads(env.run(env.submit("full", "job-legacyforeign", tenant="globex", max_steps=2))["error"])
    assert legacy["code"] == "not_found" and "line" not in legacy["message"]
    legacy_own = json.loads(env.run(env.submit("full", "job-legacyownfile", max_steps=2))["error"])
    assert legacy_own["code"] == "invalid_input" and "line 2" in legacy_own["message"]

    # Files of another purpose, and storage URIs the operator did not allow, are refused too.
    env.training_file = env.files.create_bytes("default", "out.jsonl", "batch_output", b'{"text": "x"}\n').id
    wrong = json.loads(env.run(env.submit("full", "job-wrongpurpose", max_steps=2))["error"])
    assert wrong["code"] == "invalid_input" and "purpose" in wrong["message"]
    uris = (env.storage.uri("results/job-0123456789ab.json"), f"{env.storage.url}/shared/../files/{private}")
    for n, uri in enumerate(uris):
        env.training_file = uri
        refused = json.loads(env.run(env.submit("full", f"job-refuseduri{n:02d}", max_steps=2))["error"])
        assert refused["code"] == "invalid_input" and refused["param"] == "training_file"


def test_a_uri_under_an_allowed_prefix_trains(env: Env) -> None:
    lines = "".join(json.dumps({"text": SENTENCE}) + "\n" for _ in range(8))
    env.training_file = env.storage.put_bytes("shared/fox.jsonl", lines.encode())
    record = env.run(env.submit("lora", "job-shareddata01", tenant="globex", max_steps=2))
    assert record["state"] == "succeeded", record.get("error")
