"""A batch cancelled right after it is created: its lines are closed as cancelled and never decoded.

The worker's own token counter (``queueformer_tokens_generated_total`` on its metrics port) says how
much decoding happened, whatever the batch's files say.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from queueformer.client import Client
from queueformer.server.cluster import Cluster
from tests.conftest import free_port
from tests.helpers import jsonl, make_settings

REGISTRY = """\
models:
  tiny-gpt2:
    task: generate
    path: tiny-gpt2
    dtype: float32
    device_map: cpu
    max_batch_size: 16
    max_input_tokens: 256
"""
LINES, MAX_TOKENS = 64, 200


@pytest.fixture(scope="module")
def cluster(module_redis_url: str, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cancel")
    (tmp / "models.yaml").write_text(REGISTRY)
    settings = make_settings(module_redis_url, tmp, tiny_models, registry=str(tmp / "models.yaml"))
    c = Cluster(settings, api_port=free_port(), worker_health_ports=[free_port()])
    with c.running(timeout=240):
        yield c


def generated(cluster: Cluster) -> float:
    assert cluster.worker_health_ports
    text = httpx.get(f"http://127.0.0.1:{cluster.worker_health_ports[0]}/metrics", timeout=10).text
    found = re.search(r'^queueformer_tokens_generated_total\{model="tiny-gpt2"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def settled(cluster: Cluster, quiet_s: float = 2.0) -> float:
    """The counter once it has not moved for ``quiet_s`` (the worker is done with what it was given)."""
    last, since = generated(cluster), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.25)
        now = generated(cluster)
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_lines_of_a_batch_cancelled_right_after_creation_are_never_decoded(cluster: Cluster) -> None:
    body = {"model": "tiny-gpt2", "prompt": "The weather today", "max_tokens": MAX_TOKENS, "ignore_eos": True}
    line = {"method": "POST", "url": "/v1/completions", "body": body}
    data = jsonl([{"custom_id": f"r{i}", **line} for i in range(LINES)])
    with Client(cluster.api_url) as qf:
        before = generated(cluster)
        file = qf.upload(data)
        batch = qf.create_batch(file["id"], "/v1/completions")
        qf.cancel_batch(batch["id"])
        done = qf.wait_batch(batch["id"], timeout=120)
        assert done["status"] == "cancelled" and done["request_counts"]["completed"] == 0, done
        wasted = settled(cluster) - before

        # The counter is live: one line that runs decodes its tokens.
        one = qf.create_batch(qf.upload(data.splitlines(keepends=True)[0])["id"], "/v1/completions")
        assert qf.wait_batch(one["id"], timeout=120)["status"] == "completed"
        ran = settled(cluster) - before - wasted
    print(f"tokens decoded for the cancelled batch: {wasted:.0f} of {LINES * MAX_TOKENS}; one line: {ran:.0f}")
    assert ran >= MAX_TOKENS - 1  # the first token comes from the prefill, which the counter leaves out
    # Only rows the engine had admitted before the cancel landed may have decoded, for at most one
    # cancel poll (cancel_poll_steps, 8 steps of 16 rows): about 1% of the batch, never the batch.
    assert wasted <= 0.03 * LINES * MAX_TOKENS, wasted
