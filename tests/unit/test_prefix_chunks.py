"""Batch chunks keep lines that share a prompt prefix together, so one worker's engine prefills it once."""

from __future__ import annotations

import json
from pathlib import Path

from queueformer.contract.jobs import GenerateJob
from queueformer.contract.prefix import PREFIX_CHARS, prefix_key
from queueformer.server.batch_input import Scan, iter_range, scan_file
from queueformer.server.storage import Storage

FEW_SHOT = {
    "a": "Classify the sentiment. Examples: I loved it -> positive. It broke at once -> negative. " * 3,
    "b": "Extract the city from the sentence. Examples: We flew to Paris -> Paris. I live in Rome -> Rome. " * 3,
}


def completion(i: int, prompt: str, model: str = "m") -> dict[str, object]:
    return {
        "custom_id": f"r{i}",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": model, "prompt": prompt},
    }


def test_prefix_key_follows_the_shared_start_of_prompts_and_chat_turns() -> None:
    a1 = GenerateJob(model="m", prompt=FEW_SHOT["a"] + " Great film ->")
    a2 = GenerateJob(model="m", prompt=FEW_SHOT["a"] + " Awful ->")
    b1 = GenerateJob(model="m", prompt=FEW_SHOT["b"] + " Oslo is cold ->")
    assert prefix_key(a1) == prefix_key(a2) != prefix_key(b1)
    assert prefix_key(GenerateJob(model="m", prompt="x" * PREFIX_CHARS)) is None  # too short to be worth it
    system = {"role": "system", "content": "Answer in one word."}
    c1 = GenerateJob(model="m", messages=[system, {"role": "user", "content": "Hi"}])
    c2 = GenerateJob(model="m", messages=[system, {"role": "user", "content": "Bye"}])
    c3 = GenerateJob(model="m", messages=[{"role": "user", "content": "Bye"}])
    assert prefix_key(c1) == prefix_key(c2) is not None and prefix_key(c3) is None


def scan(tmp_path: Path, lines: list[dict[str, object] | str]) -> tuple[Storage, bytes, Scan]:
    data = b"".join((x if isinstance(x, str) else json.dumps(x)).encode() + b"\n" for x in lines)
    storage = Storage(f"file://{tmp_path}")
    storage.put_bytes("input.jsonl", data)
    return storage, data, scan_file(storage, "input.jsonl", "/v1/completions", 10_000, max_line_bytes=2000)


def test_interleaved_prefix_groups_each_land_in_one_chunk(tmp_path: Path) -> None:
    lines: list[dict[str, object] | str] = []
    for i in range(60):
        if i % 3 == 2:
            lines.append(completion(i, f"unique line {i}"))
        else:
            lines.append(completion(i, FEW_SHOT["ab"[i % 3]] + f" item {i} ->"))
    lines.insert(30, "x" * 3000)  # an over-long line: no chunk's byte range may contain it
    _, data, result = scan(tmp_path, lines)
    chunks = result.chunks(16)
    seen: dict[int, int] = {}
    for c in chunks:
        assert c.count is not None and c.count <= 16
        (named,) = c.models.values()
        rows = list(iter_range(data[c.start : c.end], c.first))
        picked = [i for i, _ in rows if named is None or i in named]
        assert 30 not in {i for i, _ in rows}
        for i in picked:
            assert i not in seen
            seen[i] = c.index
    assert sorted(seen) == [i for i in range(61) if i != 30]
    # every line of one prefix group before (and after) the over-long line shares a chunk
    for group in ("a", "b"):
        for lo, hi in ((0, 30), (31, 61)):
            members = [
                i for i in range(lo, hi) if FEW_SHOT[group][:40] in json.loads(data.split(b"\n")[i])["body"]["prompt"]
            ]
            assert len({seen[i] for i in members}) == 1, (group, lo)


def test_without_shared_prefixes_chunks_stay_consecutive_byte_ranges(tmp_path: Path) -> None:
    _, _, result = scan(tmp_path, [completion(i, f"line {i}") for i in range(40)])
    chunks = result.chunks(16)
    assert [(c.first, c.last, c.count, c.models) for c in chunks] == [
        (0, 15, 16, {"m": None}),
        (16, 31, 16, {"m": None}),
        (32, 39, 8, {"m": None}),
    ]
