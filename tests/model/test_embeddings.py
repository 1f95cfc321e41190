"""Embeddings through the cluster equal a manual pooled forward pass (1e-5), on an encoder and a decoder.

Three ways in: the OpenAI SDK's ``embeddings.create`` (float and base64), an OpenAI batch with
``/v1/embeddings`` lines, and native ``embed`` jobs with every pooling, ``dimensions`` and ``normalize``.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
import torch.nn.functional as F
import transformers

from queueformer.client import Client
from queueformer.server.cluster import Cluster
from tests.conftest import free_port
from tests.helpers import jsonl, make_settings

TEXTS = ["the cat sleeps on the warm mat", "a dog", "the weather is good today and the sun is out", "x"]
MODELS = {"embed-bert": "tiny-bert", "embed-gpt2": "tiny-gpt2"}


@pytest.fixture(scope="module")
def cluster(module_redis_url: str, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("embeddings")
    registry = tmp / "registry.yaml"
    lines = ["models:"]
    for name, path in MODELS.items():
        lines += [f"  {name}:", "    task: embed", f"    path: {path}", "    device_map: cpu", "    dtype: float32"]
    registry.write_text("\n".join(lines) + "\n")
    settings = make_settings(module_redis_url, tmp, tiny_models, registry=str(registry))
    with Cluster(settings, api_port=free_port(), worker_concurrency=8).running(timeout=300) as c:
        yield c


def manual(tiny_models: Path, model: str, texts: list[str], pooling: str, dims: int | None, norm: bool) -> torch.Tensor:
    """Plain transformers: one text at a time, no padding, the pooling written out by hand."""
    path = tiny_models / MODELS[model]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    net = transformers.AutoModel.from_pretrained(path).eval()
    rows = []
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            hidden = net(input_ids=ids).last_hidden_state[0].float()
        vec = {"mean": hidden.mean(0), "cls": hidden[0], "last": hidden[-1]}[pooling]
        vec = vec[:dims] if dims else vec
        rows.append(F.normalize(vec, dim=-1) if norm else vec)
    return torch.stack(rows)


def close(got: list[list[float]], want: torch.Tensor) -> bool:
    return torch.allclose(torch.tensor(got), want, atol=1e-5)


@pytest.mark.parametrize("model", list(MODELS))
def test_the_openai_sdk_gets_vectors_equal_to_a_pooled_forward_pass(
    cluster: Cluster, tiny_models: Path, model: str
) -> None:
    client = openai.OpenAI(base_url=f"{cluster.api_url}/v1", api_key="unused")
    got = client.embeddings.create(model=model, input=TEXTS)
    assert [d.index for d in got.data] == list(range(len(TEXTS))) and got.usage.prompt_tokens > len(TEXTS)
    assert close([d.embedding for d in got.data], manual(tiny_models, model, TEXTS, "mean", None, True))
    raw = client.embeddings.create(model=model, input=TEXTS[0], encoding_format="base64", dimensions=16)
    blob = base64.b64decode(raw.data[0].embedding)  # type: ignore[arg-type]
    vector = list(struct.unpack(f"<{len(blob) // 4}f", blob))
    assert len(vector) == 16 and close([vector], manual(tiny_models, model, TEXTS[:1], "mean", 16, True))


def test_embedding_batch_lines_run_unchanged(cluster: Cluster, tiny_models: Path) -> None:
    client = openai.OpenAI(base_url=f"{cluster.api_url}/v1", api_key="unused")
    lines = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": "embed-bert", "input": t}}
        for i, t in enumerate(TEXTS)
    ]
    lines.append({**lines[0], "custom_id": "bad", "body": {"model": "embed-bert", "input": "x", "echo": True}})
    f = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    with Client(cluster.api_url) as qf:
        done = qf.wait_batch(batch.id, timeout=120)
        out, err = qf.batch_results(done)
    want = manual(tiny_models, "embed-bert", TEXTS, "mean", None, True)
    by_id = {o["custom_id"]: o["response"]["body"]["data"][0]["embedding"] for o in out}
    assert close([by_id[f"e{i}"] for i in range(len(TEXTS))], want)
    assert [(e["custom_id"], e["response"]["body"]["error"]["param"]) for e in err] == [("bad", "body.echo")]


@pytest.mark.parametrize(("model", "pooling"), [("embed-gpt2", "last"), ("embed-bert", "cls"), ("embed-gpt2", "mean")])
def test_native_jobs_pool_cut_and_normalise_as_asked(
    cluster: Cluster, tiny_models: Path, model: str, pooling: str
) -> None:
    with Client(cluster.api_url) as qf:
        ids = qf.submit_many(
            [
                {"task": "embed", "model": model, "input": TEXTS, "pooling": pooling},
                {"task": "embed", "model": model, "input": TEXTS, "pooling": pooling, "dimensions": 8},
                {"task": "embed", "model": model, "input": TEXTS, "pooling": pooling, "normalize": False},
            ]
        )
        results = [qf.result(j) if qf.wait(j, timeout=120)["state"] == "succeeded" else qf.job(j) for j in ids]
    for result, (dims, norm) in zip(results, [(None, True), (8, True), (None, False)], strict=True):
        assert close(result["embeddings"], manual(tiny_models, model, TEXTS, pooling, dims, norm)), (dims, norm)


def test_bad_embedding_requests_are_4xx(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.api_url}/v1", api_key="unused", max_retries=0)
    cases: list[dict[str, Any]] = [
        {"model": "embed-bert", "input": "x", "dimensions": 100_000},  # wider than the model
        {"model": "embed-bert", "input": [10**6]},  # a token id outside the vocabulary
        {"model": "tiny-nope", "input": "x"},
        {"model": "embed-bert", "input": []},
    ]
    for body in cases:
        with pytest.raises(openai.APIStatusError) as info:
            client.embeddings.create(**body)
        assert 400 <= info.value.status_code < 500, (body, info.value.status_code)
