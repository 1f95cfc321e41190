"""The registry is the allowlist: names, tasks, queues and loading options."""

from __future__ import annotations

from pathlib import Path

import pytest

from queueformer.contract.errors import ModelNotFound, TaskMismatch
from queueformer.contract.registry import Quantization, Registry


def test_bundled_registries_load() -> None:
    tiny = Registry.load("tiny")
    assert {"tiny-gpt2", "tiny-bert", "tiny-sentiment", "tiny-marian-en-de", "echo"} <= set(tiny.names)
    hub = Registry.load("hub")
    assert hub.get("distilgpt2").hub_id == "distilbert/distilgpt2"
    assert hub.get("distilgpt2-nf4").quantization == Quantization.NF4
    assert all(not e.trust_remote_code for e in [*tiny, *hub])


def test_unknown_model_lists_the_registered_names() -> None:
    reg = Registry.load("tiny")
    with pytest.raises(ModelNotFound) as info:
        reg.get("gpt-5")
    assert "tiny-gpt2" in info.value.message
    assert info.value.details["registered"] == reg.names
    assert info.value.http_status == 404


def test_task_must_match_the_model() -> None:
    reg = Registry.load("tiny")
    with pytest.raises(TaskMismatch):
        reg.get("tiny-bert", "generate")
    assert reg.get("tiny-gpt2", "fine-tune").name == "tiny-gpt2"


def test_queues_are_derived_from_entries(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "models:\n"
        "  a/b:c:\n    task: generate\n    hub_id: org/a\n"
        "  shared-1:\n    task: classify\n    path: m1\n    queue: encoders\n"
        "  shared-2:\n    task: fill-mask\n    path: m2\n    queue: encoders\n"
        "fine_tune:\n  queue: ft\n  serve_queue: ft-serve\n  bases: [a/b:c]\n"
    )
    reg = Registry.load(str(path))
    queues = reg.queues()
    assert reg.get("a/b:c").queue == "a-b-c"
    assert {e.name for e in queues["encoders"]} == {"shared-1", "shared-2"}
    assert set(queues) == {"a-b-c", "encoders", "ft", "ft-serve"}
    assert reg.queue_for(reg.get("a/b:c"), "fine-tune") == "ft"
    with pytest.raises(TaskMismatch):
        reg.queue_for(reg.get("shared-1"), "fine-tune")


@pytest.mark.parametrize(
    "spec",
    [
        "models:\n  x:\n    task: generate\n",  # no source
        "models:\n  x:\n    task: generate\n    hub_id: a\n    path: b\n",  # two sources
        "models:\n  x:\n    task: generate\n    hub_id: a\n    queue: 'bad queue'\n",
        "models:\n  x:\n    task: dance\n    hub_id: a\n",
        "models:\n  x:\n    task: generate\n    hub_id: a\n    quantization: int3\n",
        "models: [1, 2]\n",
    ],
)
def test_bad_registries_fail_at_load(spec: str) -> None:
    with pytest.raises(ValueError):
        Registry.from_yaml(spec)


def test_relative_paths_start_at_models_dir(tmp_path: Path) -> None:
    reg = Registry.load("tiny")
    source, local = reg.get("tiny-gpt2").source(tmp_path)
    assert source == str(tmp_path / "tiny-gpt2") and local
    hub = Registry.load("hub").get("distilgpt2").source(tmp_path)
    assert hub == ("distilbert/distilgpt2", False)


def test_tenant_models_are_invisible_to_other_tenants() -> None:
    reg = Registry.load("tiny")
    private = Registry.from_yaml("models:\n  ft:x:\n    task: generate\n    path: p\n    tenant: acme\n")
    merged = reg.with_entries({e.name: e for e in private})
    assert merged.get("ft:x", tenant="acme").tenant == "acme"
    with pytest.raises(ModelNotFound) as info:
        merged.get("ft:x", tenant="other")
    assert "ft:x" not in info.value.details["registered"]
