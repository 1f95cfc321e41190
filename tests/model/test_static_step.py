"""The static decode step in its eager form (the code CUDA graphs capture, run directly on CPU).

Its greedy output equals the engine's eager step and ``model.generate`` token for token: one row alone,
and a mixed batch whose rows differ in length, retire at different steps and are joined mid-flight
(batch sizes 3 and 5, which are not buckets; an arena that grows past its first 64 columns). Seeded
sampling draws the same tokens too: the two steps hand the same logits to the same pickers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from queueformer.contract.registry import ModelEntry
from tests.model.static_cases import FIRST, LATE, Case, alone, job, llama_gqa, run_mixed
from workers.engine.item import WorkItem
from workers.engine.kvcache import SlabCache, num_layers
from workers.engine.static_step import StaticStep, bucket, unsupported
from workers.holder import Served, serve


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa"])
def path(request: pytest.FixtureRequest, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param == "gpt2":
        return tiny_models / "tiny-gpt2"
    return llama_gqa(tmp_path_factory.mktemp("static"), tiny_models / "tiny-gpt2")


def engine(path: Path, static_decode: str, name: str) -> Served:
    entry = ModelEntry(
        name=name, task="generate", path=str(path), device_map="cpu", max_batch_size=8, static_decode=static_decode
    )
    return serve(entry, path.parent)


@pytest.fixture(scope="module")
def static(path: Path) -> Iterator[Served]:
    served = engine(path, "on", "static")
    yield served
    served.stop()


@pytest.fixture(scope="module")
def eager(path: Path) -> Iterator[Served]:
    served = engine(path, "off", "eager")
    yield served
    served.stop()


def step_of(served: Served) -> StaticStep:
    step = served.engine._static  # type: ignore[union-attr]
    assert isinstance(step, StaticStep) and not step.graphs  # the eager form: no CUDA here
    return step


def test_one_row_alone_equals_the_eager_step_and_generate(static: Served, eager: Served) -> None:
    step = step_of(static)
    before = step.steps
    got = run_one(static, "The old bridge crosses the river", 24)
    assert step.steps - before == 23  # every step after the prefill's token ran on the static step
    assert got == run_one(eager, "The old bridge crosses the river", 24)
    assert got == alone(static, "The old bridge crosses the river", 24)


def run_one(served: Served, prompt: str, new: int) -> list[int]:
    item = served.engine.submit(WorkItem(served.handler.preprocess(job(served, Case(prompt, new)))))
    return list(item.future.result(timeout=60)[0].token_ids)


def test_a_mixed_batch_joining_and_retiring_equals_the_eager_step_and_generate(static: Served, eager: Served) -> None:
    step = step_of(static)
    loads = step.loads
    got = run_mixed(static)
    assert step.loads - loads >= 3  # the first batch, the join, row removals and the arena's growth
    assert step.columns >= 128  # the long row outgrew the first arena
    assert got == run_mixed(eager)
    for case, tokens in zip(FIRST + LATE, got, strict=True):
        if not case.sample:
            assert tokens == alone(static, case.prompt, case.new), case.prompt


def test_buckets_are_powers_of_two() -> None:
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9, 33)] == [1, 2, 4, 8, 8, 16, 64]
    assert bucket(3, 64) == 64 and bucket(65, 64) == 128


def test_off_and_auto_on_cpu_keep_the_eager_step(tiny_models: Path) -> None:
    for mode in ("off", "auto"):
        served = engine(tiny_models / "tiny-gpt2", mode, f"plain-{mode}")
        try:
            assert served.engine._static is None  # type: ignore[union-attr]
        finally:
            served.stop()


def test_models_the_graphs_cannot_hold_are_named() -> None:
    model: Any = torch.nn.Linear(1, 1)  # its module (torch.nn.modules.linear) builds no causal masks
    model.config = SimpleNamespace()
    assert unsupported(model, graphs=False) == "its attention masks are not built by transformers.masking_utils"


def test_int8_with_outlier_splitting_is_not_captured(static: Served) -> None:
    model = static.handler.model
    assert unsupported(model, graphs=True) is None
    model.config.quantization_config = {"load_in_8bit": True, "llm_int8_threshold": 6.0}
    try:
        assert "int8" in str(unsupported(model, graphs=True))
        assert unsupported(model, graphs=False) is None  # the eager form runs it
    finally:
        del model.config.quantization_config


def test_a_batch_trimmed_at_every_step_moves_back_to_the_arena_s_first_column(static: Served) -> None:
    # The engine trims leading all-padding columns; here a 10-column window slides along for 80 steps,
    # so the written column reaches the arena's end while the batch stays narrow: the span moves back
    # to column 0 of the same arena (an overlapping copy), and each step matches the eager one.
    model = static.handler.model
    step = StaticStep(model, pad_id=0, graphs=False, name="window")
    ids = torch.arange(5, 65).view(3, 20)
    caches, nxt = [], torch.empty(0)
    for _ in range(2):
        cache = SlabCache(num_layers(model.config))
        with torch.inference_mode():
            out = model(input_ids=ids, position_ids=torch.arange(20).expand(3, 20), cache=cache, logits_to_keep=1)
        caches.append(cache)
        nxt = out.logits[:, -1].argmax(-1)
    fast, slow = caches
    mask, pos = torch.ones((3, 10), dtype=torch.long), torch.full((3,), 20)
    fast.trim_left(10)
    slow.trim_left(10)
    for _ in range(80):
        got = step(fast, mask, nxt, pos)
        with torch.inference_mode():
            want = model(
                input_ids=nxt[:, None],
                attention_mask=F.pad(mask, (0, 1), value=1),
                position_ids=pos[:, None],
                cache=slow,
                logits_to_keep=1,
            ).logits[:, -1]
        assert got is not None, "the step ran"
        # float32 rounding only (attention sums over more, masked, columns): about 1e-6 of the logits
        assert torch.allclose(got, want, atol=1e-4) and torch.equal(got.argmax(-1), want.argmax(-1))
        nxt, pos = want.argmax(-1), pos + 1
        fast.trim_left(1)
        slow.trim_left(1)
    assert step.loads == 2 and step.columns == 64  # bound once, moved back once, never grown
