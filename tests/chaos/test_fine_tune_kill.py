"""A fine-tune worker SIGKILLed mid-training: the redelivered job resumes from its last checkpoint."""

from __future__ import annotations

import time
from typing import Any

from queueformer.client import Client
from queueformer.server.cluster import Cluster
from tests.helpers import eventually, jsonl

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today."
SHAPE = {"learning_rate": 1e-3, "block_size": 32, "batch_size": 8}


def start_fine_tune(qf: Client, method: str, max_steps: int, checkpoint_steps: int) -> str:
    """Upload the training file and create the job; returns the job's API path."""
    training = qf.upload(jsonl([{"text": SENTENCE}] * 40), purpose="fine-tune")["id"]
    hp = {"max_steps": max_steps, "checkpoint_steps": checkpoint_steps, **SHAPE}
    body = {"model": "tiny-gpt2", "training_file": training, "method": method, "hyperparameters": hp}
    return f"/v1/fine_tuning/jobs/{qf.http.post('/v1/fine_tuning/jobs', json=body).json()['id']}"


def wait_end(qf: Client, path: str) -> dict[str, Any]:
    done: dict[str, Any] = eventually(
        lambda: (j := qf.http.get(path).json())["status"] in ("succeeded", "failed") and j, timeout=240, interval=1
    )
    return done


def test_a_killed_fine_tune_resumes_from_its_checkpoint_and_completes(chaos_cluster: tuple[Cluster, Any]) -> None:
    cluster, new_worker = chaos_cluster
    with Client(cluster.api_url) as qf:
        path = start_fine_tune(qf, "full", max_steps=400, checkpoint_steps=25)
        worker = new_worker(["fine-tune"])

        def past_a_checkpoint() -> int:
            steps = [c["step_number"] for c in qf.http.get(f"{path}/checkpoints").json()["data"]]
            step = qf.http.get(path).json()["progress"].get("step", 0)
            return max(steps) if steps and steps[0] >= 50 and step > steps[0] + 5 else 0

        eventually(past_a_checkpoint, timeout=180, interval=0.2)
        worker.kill()
        killed_at = time.monotonic()
        kept = max(c["step_number"] for c in qf.http.get(f"{path}/checkpoints").json()["data"])
        new_worker(["fine-tune"])
        done = wait_end(qf, path)
        assert done["status"] == "succeeded", done["error"]
        result = qf.result(path.rsplit("/", 1)[1])
        assert result["resumed_from_step"] == kept and result["steps"] == 400
        messages = [e["message"] for e in qf.http.get(f"{path}/events", params={"limit": 1000}).json()["data"]]
        assert f"Resumed from the checkpoint at step {kept}" in messages
        print(f"\nkilled after step {kept}; resumed and finished {time.monotonic() - killed_at:.1f}s after the kill")


def test_sigterm_checkpoints_a_running_fine_tune_and_hands_it_to_the_next_worker(
    chaos_cluster: tuple[Cluster, Any],
) -> None:
    cluster, new_worker = chaos_cluster
    with Client(cluster.api_url) as qf:
        # No periodic checkpoint before the drain: whatever resumes comes from the drain's own checkpoint.
        path = start_fine_tune(qf, "lora", max_steps=1500, checkpoint_steps=10_000)
        worker = new_worker(["fine-tune"])
        eventually(lambda: qf.http.get(path).json()["progress"].get("step", 0) >= 40, timeout=180, interval=0.2)
        started = time.monotonic()
        assert worker.terminate(timeout=120) == 0
        drain_s = time.monotonic() - started
        saved = [c["step_number"] for c in qf.http.get(f"{path}/checkpoints").json()["data"]]
        assert len(saved) == 1 and 40 <= saved[0] < 1500
        record = qf.http.get(path).json()
        assert record["status"] == "queued" and record["attempts"] == 0  # handed back, not counted as a failure
        new_worker(["fine-tune"])
        done = wait_end(qf, path)
        assert done["status"] == "succeeded", done["error"]
        assert qf.result(path.rsplit("/", 1)[1])["resumed_from_step"] == saved[0]
        print(f"\nSIGTERM at step {saved[0]}: checkpointed and exited in {drain_s:.1f}s; resumed there")
