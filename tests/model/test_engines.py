"""The engines on the real tiny models: continuous batching, sampling, stops, cancel, deadlines, OOM."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GenerationConfig

from queueformer.contract.errors import Cancelled, DeadlineExceeded, OutOfMemory
from queueformer.contract.jobs import ClassifyJob, GenerateJob
from queueformer.contract.registry import ModelEntry
from workers.engine.item import WorkItem
from workers.holder import ModelHolder, Served, serve


@pytest.fixture(scope="module")
def gen(tiny_models: Path) -> Iterator[Served]:
    served = serve(
        ModelEntry(name="g", task="generate", path="tiny-gpt2", device_map="cpu", max_batch_size=8), tiny_models
    )
    yield served
    served.stop()


@pytest.fixture(scope="module")
def cls(tiny_models: Path) -> Iterator[Served]:
    served = serve(ModelEntry(name="c", task="classify", path="tiny-sentiment", device_map="cpu"), tiny_models)
    yield served
    served.stop()


def run(served: Served, **job: Any) -> Any:
    prepared = served.handler.preprocess(GenerateJob(model="g", **job))
    item = served.engine.submit(WorkItem(prepared))
    return served.handler.postprocess(prepared, item.future.result(timeout=60))


def reference_tokens(served: Served, prompt: str, **kwargs: Any) -> list[list[int]]:
    tok, model = served.handler.tokenizer, served.handler.model
    ids = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, **kwargs)
    return [row[ids["input_ids"].shape[1] :] for row in out.tolist()]


def test_sequences_join_and_leave_a_running_batch(gen: Served) -> None:
    long = [GenerateJob(model="g", prompt=f"The weather {i}", max_new_tokens=40, ignore_eos=True) for i in range(4)]
    items = [gen.engine.submit(WorkItem(gen.handler.preprocess(j))) for j in long]
    time.sleep(0.05)  # the long ones are decoding; these join mid-flight
    short = [GenerateJob(model="g", prompt=p, max_new_tokens=6) for p in ("A queue holds", "The cat")]
    late = [gen.engine.submit(WorkItem(gen.handler.preprocess(j))) for j in short]
    for job, it in zip(long + short, items + late, strict=True):
        got = it.future.result(timeout=60)[0].token_ids
        kwargs = {"max_new_tokens": job.max_new_tokens, "do_sample": False}
        if job.ignore_eos:
            kwargs["eos_token_id"] = []
        assert got == reference_tokens(gen, job.prompt, **kwargs)[0]


def test_a_wide_batch_of_mixed_lengths_decodes_each_row_as_if_alone(tiny_models: Path) -> None:
    # 96 rows: decode steps attend in runs of 32 rows, each from its own first unpadded column.
    wide = serve(
        ModelEntry(name="w", task="generate", path="tiny-gpt2", device_map="cpu", max_batch_size=128), tiny_models
    )
    try:
        sentence = "the old bridge crosses the river near the village and a queue holds jobs until"
        words = sentence.split(" ")
        prompts = [" ".join(words[: 1 + i % len(words)] * (1 + i // 24)) for i in range(96)]
        jobs = [GenerateJob(model="w", prompt=p, max_new_tokens=12, ignore_eos=True) for p in prompts]
        items = [wide.engine.submit(WorkItem(wide.handler.preprocess(j))) for j in jobs]
        for prompt, it in zip(prompts, items, strict=True):
            want = reference_tokens(wide, prompt, max_new_tokens=12, do_sample=False, eos_token_id=[])[0]
            assert it.future.result(timeout=120)[0].token_ids == want
    finally:
        wide.stop()


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(gen: Served) -> None:
    job = {
        "prompt": "The weather",
        "max_new_tokens": 16,
        "do_sample": True,
        "top_k": 20,
        "temperature": 0.9,
        "seed": 11,
    }
    alone = run(gen, **job).generations[0].token_ids
    others = [
        gen.engine.submit(
            WorkItem(
                gen.handler.preprocess(GenerateJob(model="g", prompt=f"Noise {i}", max_new_tokens=16, do_sample=True))
            )
        )
        for i in range(5)
    ]
    again = run(gen, **job).generations[0].token_ids
    for it in others:
        it.future.result(timeout=60)
    assert alone == again
    two = run(gen, **{**job, "num_return_sequences": 2})
    assert len(two.generations) == 2 and two.usage.completion_tokens == sum(len(g.token_ids) for g in two.generations)


def test_stop_strings_cut_the_text_and_set_finish_reason(gen: Served) -> None:
    result = run(gen, prompt="The weather today", max_new_tokens=30, stop=["wind"])
    g = result.generations[0]
    assert g.finish_reason == "stop" and g.text == " is sunny with a light "
    free = run(gen, prompt="The weather today", max_new_tokens=3)
    assert free.generations[0].finish_reason == "length"


def test_beam_search_and_repetition_penalty_match_generate(gen: Served) -> None:
    beams = run(gen, prompt="The cat", max_new_tokens=10, num_beams=3, num_return_sequences=2)
    want = reference_tokens(gen, "The cat", max_new_tokens=10, num_beams=3, num_return_sequences=2)
    assert [g.token_ids for g in beams.generations] == want
    pen = run(gen, prompt="The cat", max_new_tokens=12, repetition_penalty=1.8)
    assert (
        pen.generations[0].token_ids == reference_tokens(gen, "The cat", max_new_tokens=12, repetition_penalty=1.8)[0]
    )


def test_cancel_and_deadline_stop_decoding_mid_sequence(gen: Served) -> None:
    flag = threading.Event()
    prepared = gen.handler.preprocess(GenerateJob(model="g", prompt="x", max_new_tokens=250, ignore_eos=True))
    item = gen.engine.submit(WorkItem(prepared, cancelled=flag.is_set))
    time.sleep(0.1)
    flag.set()
    with pytest.raises(Cancelled):
        item.future.result(timeout=30)
    late = gen.engine.submit(WorkItem(prepared, deadline=time.monotonic() + 0.05))
    with pytest.raises(DeadlineExceeded):
        late.future.result(timeout=30)
    assert run(gen, prompt="The cat", max_new_tokens=4).generations[0].token_ids  # still serving


def test_oom_in_a_batch_fails_only_the_job_that_cannot_fit(gen: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    model = gen.handler.model
    poison = gen.handler.tokenizer("Poison pill prompt")["input_ids"][0]
    real_forward = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1 and bool((ids == poison).any()):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    prompts = ["The weather today", "Poison pill prompt", "A queue holds", "The cat"]
    jobs = [GenerateJob(model="g", prompt=p, max_new_tokens=8) for p in prompts]
    items = [gen.engine.submit(WorkItem(gen.handler.preprocess(j))) for j in jobs]
    outcomes = []
    for it in items:
        try:
            outcomes.append(it.future.result(timeout=60)[0].token_ids)
        except OutOfMemory as exc:
            outcomes.append(exc.code)
    assert outcomes[1] == "out_of_memory"
    for i in (0, 2, 3):
        assert outcomes[i] == reference_tokens(gen, prompts[i], max_new_tokens=8, do_sample=False)[0]
    monkeypatch.undo()
    assert run(gen, prompt="The cat", max_new_tokens=4).generations[0].finish_reason in ("length", "stop")


def test_oom_in_an_encoder_batch_is_isolated_by_splitting(cls: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    handler = cls.handler
    real = handler.forward

    def forward(batch: Any) -> Any:
        if any(len(item.texts[0]) > 8 for item in batch):  # token count
            raise torch.OutOfMemoryError("out of memory")
        return real(batch)

    monkeypatch.setattr(handler, "forward", forward)
    texts = ["good", "this text is long enough to need more memory than the device has left", "bad"]
    items = [cls.engine.submit(WorkItem(handler.preprocess(ClassifyJob(model="c", text=t)))) for t in texts]
    assert items[0].future.result(timeout=30) and items[2].future.result(timeout=30)
    with pytest.raises(OutOfMemory):
        items[1].future.result(timeout=30)


def test_an_urgent_item_takes_a_full_batchs_place_and_the_rows_it_displaced_decode_as_before(gen: Served) -> None:
    # gen's batch holds 8 rows: 8 long low-priority rows fill it, 8 more of them wait behind.
    long = [GenerateJob(model="g", prompt=f"The weather {i}", max_new_tokens=200, ignore_eos=True) for i in range(16)]
    low = [gen.engine.submit(WorkItem(gen.handler.preprocess(j), priority=2)) for j in long]
    time.sleep(0.2)  # the first 8 are decoding
    urgent_job = GenerateJob(model="g", prompt="The cat", max_new_tokens=6)
    urgent = gen.engine.submit(WorkItem(gen.handler.preprocess(urgent_job), priority=9))
    got = urgent.future.result(timeout=60)[0].token_ids
    # It did not wait for a running row to finish, nor for the 8 waiting ones to be admitted first.
    assert not any(it.future.done() for it in low)
    assert got == reference_tokens(gen, "The cat", max_new_tokens=6, do_sample=False)[0]
    for job, it in zip(long, low, strict=True):  # the row sent back to waiting started over, same tokens
        want = reference_tokens(gen, job.prompt, max_new_tokens=200, do_sample=False, eos_token_id=[])[0]
        assert it.future.result(timeout=300)[0].token_ids == want


class Recorder:
    """Records what an engine says it is about to execute, and what was unfinished at that moment."""

    def __init__(self, everything: list[WorkItem]) -> None:
        self.everything = everything
        self.calls: list[tuple[list[str], list[str]]] = []

    def begin(self, items: Any) -> None:
        running = [it.key for it in self.everything if not it.future.done() and it.key not in {i.key for i in items}]
        self.calls.append(([it.key for it in items], [k for k in running if k is not None]))


@pytest.mark.parametrize("which", ["decode", "batch"])
def test_a_suspect_runs_alone_and_every_item_is_recorded_before_it_runs(gen: Served, cls: Served, which: str) -> None:
    served = gen if which == "decode" else cls
    everything: list[WorkItem] = []
    tracker = Recorder(everything)

    def item(i: int, alone: bool = False) -> WorkItem:
        if which == "decode":
            job: Any = GenerateJob(model="g", prompt=f"The weather {i}", max_new_tokens=12, ignore_eos=True)
        else:
            job = ClassifyJob(model="c", text=f"I love item {i}")
        it = WorkItem(served.handler.preprocess(job), key=f"line:b:{i}", alone=alone, tracker=tracker)
        everything.append(it)
        return it

    items = [item(i, alone=(i == 3)) for i in range(7)]
    for it in items:
        served.engine.submit(it)
    for it in items:
        it.future.result(timeout=60)
    began = [k for keys, _ in tracker.calls for k in keys]
    assert set(began) == {f"line:b:{i}" for i in range(7)}  # every item was recorded before it ran
    (suspect_call,) = [c for c in tracker.calls if "line:b:3" in c[0]]
    assert suspect_call[0] == ["line:b:3"]  # it began alone...
    if which == "decode":
        assert not [k for k in suspect_call[1] if k in began[: began.index("line:b:3")]]  # ...with no row running


def test_lines_with_the_same_fields_share_one_resolved_config_and_keep_the_models_stop_strings(
    tiny_models: Path, tmp_path: Path
) -> None:
    free = run_alone(tiny_models, "tiny-gpt2", prompt="The weather today", max_new_tokens=30)
    word = free.generations[0].text.split()[2]  # a word the model produces mid-way
    path = tmp_path / "stopping-gpt2"
    shutil.copytree(tiny_models / "tiny-gpt2", path)
    config = GenerationConfig.from_pretrained(path)
    config.stop_strings = [word]
    config.save_pretrained(path)
    served = serve(ModelEntry(name="g", task="generate", path=str(path), device_map="cpu"), tmp_path)
    try:
        first = served.handler.preprocess(GenerateJob(model="g", prompt="The weather today", max_new_tokens=30))
        again = served.handler.preprocess(GenerateJob(model="g", prompt="Another prompt", max_new_tokens=30))
        other = served.handler.preprocess(GenerateJob(model="g", prompt="The weather today", max_new_tokens=29))
        assert first.generation is again.generation and other.generation is not first.generation
        assert first.stop == again.stop == other.stop == (word,)  # the model's stop string, every time
        for prepared in (first, first):
            item = served.engine.submit(WorkItem(prepared))
            result = served.handler.postprocess(prepared, item.future.result(timeout=60))
            assert result.generations[0].finish_reason == "stop" and word not in result.generations[0].text
    finally:
        served.stop()


def run_alone(tiny_models: Path, path: str, **job: Any) -> Any:
    served = serve(ModelEntry(name="g", task="generate", path=path, device_map="cpu"), tiny_models)
    try:
        return run(served, **job)
    finally:
        served.stop()


def test_a_worker_loads_and_runs_every_model_on_its_one_lane(tiny_models: Path) -> None:
    # torch's OpenMP pool slows every thread once a second thread has run parallel work (workers.engine.lane)
    holder = ModelHolder()
    try:
        for entry in (
            ModelEntry(name="g", task="generate", path="tiny-gpt2", device_map="cpu"),
            ModelEntry(name="c", task="classify", path="tiny-sentiment", device_map="cpu"),
        ):
            holder.add(serve(entry, tiny_models, lane=holder.lane))
        threads: set[int] = set()
        for s in holder.all():
            s.handler.model.register_forward_pre_hook(lambda *_: threads.add(threading.get_ident()))
        g, c = holder.get("g"), holder.get("c")
        jobs = [
            (g, g.engine.submit(WorkItem(g.handler.preprocess(GenerateJob(model="g", prompt=f"The cat {i}")))))
            for i in range(4)
        ] + [
            (c, c.engine.submit(WorkItem(c.handler.preprocess(ClassifyJob(model="c", text=f"good day {i}")))))
            for i in range(4)
        ]
        for served, item in jobs:
            served.handler.postprocess(item.prepared, item.future.result(timeout=60))
        assert threads == {holder.lane.call(threading.get_ident)}
        assert holder.lane.call(lambda: g.handler.model.device.type) == "cpu"
        names = {t.name for t in threading.enumerate()}
        assert not {n for n in names if n.startswith(("decode-", "engine-"))}  # no engine thread of its own
        assert holder.healthy
    finally:
        holder.stop()
    assert not holder.lane.alive and not holder.healthy  # a worker whose lane is gone reports unhealthy
