"""A poison line: one input that kills its worker whenever it runs. It is found and quarantined alone as
``poison_input``; every other line of its batch succeeds, none of them quarantined for having shared a
batch with it.

The poison is real, not staged: a GPT-2 with a wide MLP (``n_inner`` 32,768) and a 4,096-token context,
served by a worker with a memory limit (``QUEUEFORMER_WORKER__MEMORY_LIMIT_MB``) a little above what
it uses idle. Short prompts need a few MB of activations; a 3,000-token prompt needs ~400 MB per MLP
activation, and the worker dies the way a container past its memory limit is killed (SIGKILL). Default
settings otherwise; `up`'s supervisor restarts the worker after each death.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from queueformer.client import Client
from queueformer.server.cluster import Cluster
from queueformer.server.embedded import EmbeddedRedis
from queueformer.server.supervisor import Supervisor
from tests.conftest import free_port
from tests.helpers import eventually, jsonl, make_settings

POISON = 12
HEADROOM_MB = 250


def wide_gpt2(tiny_models: Path, out: Path) -> Path:
    """tiny-gpt2's tokenizer on a GPT-2 whose MLP activations are large per prompt token."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "tiny-gpt2")
    tokenizer.model_max_length = 4096
    tokenizer.save_pretrained(out)
    base = GPT2Config.from_pretrained(tiny_models / "tiny-gpt2")
    config = GPT2Config(
        vocab_size=base.vocab_size,
        n_positions=4096,
        n_embd=64,
        n_layer=1,
        n_head=4,
        n_inner=32768,
        activation_function="relu",
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


def line(i: int, prompt: str) -> dict[str, Any]:
    body = {"task": "generate", "model": "wide-gpt2", "prompt": prompt, "max_new_tokens": 8, "ignore_eos": True}
    return {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/jobs", "body": body}


def resident_mb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1]) // 1024


@pytest.fixture
def supervised(own_redis: EmbeddedRedis, tiny_models: Path, tmp_path: Path) -> Iterator[tuple[Cluster, Supervisor]]:
    model = wide_gpt2(tiny_models, tmp_path / "wide-gpt2")
    registry = tmp_path / "registry.yaml"
    entry = {"task": "generate", "path": str(model), "dtype": "float32", "device_map": "cpu", "max_batch_size": 16}
    registry.write_text(yaml.safe_dump({"models": {"wide-gpt2": entry}}))
    settings = make_settings(own_redis.url, tmp_path, tiny_models, registry=str(registry))
    cluster = Cluster(settings, api_port=free_port(), worker_groups=[["wide-gpt2"]])
    cluster.start()
    stop = threading.Event()
    said: list[str] = []
    supervisor = Supervisor(cluster, say=said.append)

    def supervise() -> None:
        while not stop.wait(0.5):
            supervisor.tick()

    thread = threading.Thread(target=supervise, daemon=True)
    try:
        cluster.wait_ready(timeout=300)
        # The limit: what the worker uses with its model loaded, plus headroom for ordinary prompts.
        (worker,) = [c for c in cluster.children if c.name == "worker-0"]
        limit = resident_mb(worker.proc.pid) + HEADROOM_MB
        worker.env["QUEUEFORMER_WORKER__MEMORY_LIMIT_MB"] = str(limit)
        worker.proc.terminate()
        worker.proc.wait(60)
        cluster.respawn(worker)
        thread.start()
        eventually(cluster.ready, timeout=300, interval=0.5)
        yield cluster, supervisor
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(10)
        cluster.stop()


@pytest.mark.timeout(1500)
def test_a_poison_line_is_quarantined_alone_and_the_rest_of_its_batch_succeeds(
    supervised: tuple[Cluster, Supervisor],
) -> None:
    cluster, supervisor = supervised
    lines = [line(i, f"The weather {i} is") for i in range(30)]
    lines[POISON] = line(POISON, " the" * 3000)  # 3,000 tokens: its MLP activations pass the worker's limit
    started = time.monotonic()
    with Client(cluster.api_url) as qf:
        batch = qf.create_batch(qf.upload(jsonl(lines))["id"], "/v1/jobs")
        done = qf.wait_batch(batch["id"], timeout=1200, poll_s=1)
        out, err = qf.batch_results(done)
    elapsed = time.monotonic() - started
    assert done["request_counts"] == {"total": 30, "completed": 29, "failed": 1}, done
    assert sorted(o["custom_id"] for o in out) == sorted(f"line-{i}" for i in range(30) if i != POISON)
    (bad,) = err
    assert bad["custom_id"] == f"line-{POISON}"
    assert bad["response"]["status_code"] == 422, bad
    error = bad["response"]["body"]["error"]
    assert error["code"] == "poison_input" and "killed its worker when it ran alone" in error["message"], bad
    deaths = supervisor.restarts.get("worker-0", 0)
    assert deaths >= 2  # it ran in a batch at least once and alone once: each time it killed the worker
    print(
        f"poison line quarantined as poison_input after {deaths} worker deaths; the other 29 lines of its batch "
        f"succeeded; {elapsed:.0f}s in all ({error['message']})"
    )
