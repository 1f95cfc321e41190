"""Registry entries read from Redis never run code: hostile entries written straight into Redis.

Someone who reaches Redis can write run-time model entries (``qf:models``). The model below carries
remote code (``auto_map`` naming a module that leaves a marker file when imported); an entry that asks
for ``trust_remote_code`` must still load it with the built-in class, and entries naming a hub id or
a path outside the fine-tuned models' directory must not load at all.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from queueformer.contract.errors import ModelNotFound
from queueformer.contract.jobs import GenerateJob
from queueformer.contract.registry import Registry
from queueformer.server import keys
from queueformer.server.overlay import ModelOverlay
from queueformer.server.storage import Storage
from workers.fine_tuned import FineTunedModels

EVIL = """
from pathlib import Path

Path({marker!r}).write_text("remote code ran")

from transformers import GPT2Config, GPT2LMHeadModel


class EvilConfig(GPT2Config):
    pass


class EvilModel(GPT2LMHeadModel):
    config_class = EvilConfig
"""


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


def hostile_model(tiny_models: Path, tmp_path: Path, marker: Path) -> Path:
    """tiny-gpt2 plus remote code that would leave ``marker`` behind if it were ever imported."""
    src = tmp_path / "evil-model"
    shutil.copytree(tiny_models / "tiny-gpt2", src)
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (src / "config.json").write_text(json.dumps(config))
    (src / "evil.py").write_text(EVIL.format(marker=str(marker)))
    return src


def test_a_hostile_entry_in_redis_never_enables_remote_code_or_the_hub(
    client: redis.Redis, tiny_models: Path, tmp_path: Path
) -> None:
    storage = Storage(f"file://{tmp_path / 'storage'}")
    registry = Registry.load("tiny")
    marker = tmp_path / "remote-code-ran"
    uri = storage.put_dir(hostile_model(tiny_models, tmp_path, marker), storage.model_key("ftm-hostile00001"))
    base = {"task": "generate", "base_model": "tiny-gpt2", "queue": "tiny-gpt2", "dtype": "float32"}
    entries = {
        "ft:tiny-gpt2:evil:hostile00001": {**base, "path": uri, "trust_remote_code": True},
        "ft:tiny-gpt2:hub:hostile00002": {**base, "hub_id": "someone/evil-model", "trust_remote_code": True},
        "ft:tiny-gpt2:file:hostile00003": {**base, "path": storage.uri("files/file-0123456789abcdef")},
        "ft:tiny-gpt2:out:hostile00004": {**base, "path": f"file://{tmp_path / 'evil-model'}"},
        "tiny-gpt2-shadow": {**base, "path": uri},
    }
    for name, body in entries.items():  # straight into Redis, as an attacker would
        client.hset(keys.MODELS, name, json.dumps({"name": name, **body}))
    client.hset(keys.MODELS, "ft:tiny-gpt2:junk:hostile00005", "{not json")

    overlay = ModelOverlay(client, storage, registry.fine_tune.serve_queue)
    visible = overlay.entries()
    assert list(visible) == ["ft:tiny-gpt2:evil:hostile00001"]  # the others are ignored, not served
    entry = visible["ft:tiny-gpt2:evil:hostile00001"]
    assert entry.trust_remote_code is False and entry.queue == "fine-tuned"

    models = FineTunedModels(overlay, registry, storage, tmp_path / "models")
    served = models("ft:tiny-gpt2:evil:hostile00001")
    try:
        out = served.handler.run([GenerateJob(model=entry.name, prompt="The weather", max_new_tokens=4)])
        assert len(out[0].model_dump()["generations"][0]["token_ids"]) == 4
        assert type(served.handler.model).__name__ == "GPT2LMHeadModel"  # the built-in class, not EvilModel
    finally:
        served.stop()
    assert not marker.exists(), "remote code from a Redis entry was imported"
    for name in entries:
        if name != "ft:tiny-gpt2:evil:hostile00001":
            with pytest.raises(ModelNotFound):
                models(name)
    assert not marker.exists()
