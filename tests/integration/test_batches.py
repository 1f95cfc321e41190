"""The batch ledger on a real Redis: validation, exactly-once commits, finalization, cancel, retry."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import redis

from queueformer.contract.errors import Conflict, ErrorInfo, ModelNotFound, NotFound
from queueformer.contract.openai_batch import BatchCreate, LineError, error_line, output_line
from queueformer.contract.registry import Registry
from queueformer.contract.settings import TenantQuota
from queueformer.contract.units import LinesUnit
from queueformer.server.batches import Batches, to_openai
from queueformer.server.files import FileStore
from queueformer.server.storage import Storage
from tests.helpers import jsonl


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> tuple[Batches, FileStore, Storage]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    storage = Storage(f"file://{tmp_path}")
    files = FileStore(client, storage)
    return Batches(client, storage, files), files, storage


def lines(n: int, model: str = "tiny-gpt2") -> list[dict]:
    return [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/jobs",
            "body": {"task": "generate", "model": model, "prompt": f"p{i}"},
        }
        for i in range(n)
    ]


def check(job) -> None:  # type: ignore[no-untyped-def]
    reg = Registry.load("tiny")
    reg.get(job.model, job.task)


def new_batch(store: Batches, files: FileStore, data: bytes, chunk: int = 4) -> tuple[str, list[LinesUnit]]:
    """Create a batch through the lifecycle; returns its id and the units it published."""
    f = files.create_bytes("t1", "in.jsonl", "batch", data)
    sent: list[LinesUnit] = []
    body = BatchCreate(input_file_id=f.id, endpoint="/v1/jobs")
    raw = store.create(body, "t1", TenantQuota(), check, lambda models: chunk, sent.extend)
    return raw["id"], sent


def test_validation_reports_bad_lines_with_numbers(env: tuple[Batches, FileStore, Storage]) -> None:
    store, files, _storage = env
    rows = lines(3)
    unknown = {**lines(1, model="nope")[0], "custom_id": "unknown-model"}
    data = jsonl(rows[:2]) + b"\n" + b"{oops\n" + jsonl([rows[0]]) + jsonl([unknown]) + jsonl([rows[2]])
    batch_id, _units = new_batch(store, files, data)
    raw = store.raw(batch_id)
    assert raw["status"] == "in_progress" and raw["total"] == "6" and raw["failed"] == "3"
    errors = json.loads(raw["errors"])
    assert [(e["line"], e["code"]) for e in errors] == [
        (4, "invalid_json"),
        (5, "duplicate_custom_id"),
        (6, "model_not_found"),
    ]
    assert "tiny-gpt2" in errors[2]["message"]  # unknown models list the registered names
    # blank line 3 is skipped, not counted; the bad lines are committed to the error file already
    assert sorted(store.ledger.committed(batch_id, [0, 1, 3, 4, 5, 6])) == [3, 4, 5]


def test_every_line_commits_once_even_when_racing(env: tuple[Batches, FileStore, Storage]) -> None:
    store, files, storage = env
    batch_id, _ = new_batch(store, files, jsonl(lines(40)))

    def worker() -> None:
        for i in range(40):
            store.ledger.commit_many(batch_id, [(i, "out", output_line(f"r{i}", 200, {"i": i}), 1, 2)])

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    raw = store.raw(batch_id)
    assert (raw["completed"], raw["failed"], raw["input_tokens"], raw["output_tokens"]) == ("40", "0", "40", "80")
    assert store.maybe_finalize(batch_id)
    assert not store.maybe_finalize(batch_id)  # only one finalizer wins
    raw = store.raw(batch_id)
    assert raw["status"] == "completed" and raw["completed_at"]
    out = [json.loads(x) for x in storage.get_bytes(files.key(raw["output_file_id"])).splitlines()]
    assert sorted(o["custom_id"] for o in out) == sorted(f"r{i}" for i in range(40))
    # late duplicates after finalization change nothing
    assert (
        store.ledger.commit_many(batch_id, [(3, "err", error_line("r3", ErrorInfo(code="x", message="y")), 0, 0)])
        is None
    )
    assert store.raw(batch_id)["failed"] == "0"


def test_cancel_closes_remaining_lines_and_keeps_finished_ones(env: tuple[Batches, FileStore, Storage]) -> None:
    store, files, storage = env
    batch_id, _ = new_batch(store, files, jsonl(lines(10)))
    store.ledger.commit_many(batch_id, [(i, "out", output_line(f"r{i}", 200, {}), 0, 0) for i in range(3)])
    store.cancel(batch_id)
    raw = store.raw(batch_id)
    assert raw["status"] == "cancelled" and (raw["completed"], raw["failed"]) == ("3", "7")
    errs = [json.loads(x) for x in storage.get_bytes(files.key(raw["error_file_id"])).splitlines()]
    assert {e["error"]["code"] for e in errs} == {"batch_cancelled"}
    assert len(storage.get_bytes(files.key(raw["output_file_id"])).splitlines()) == 3


def test_retry_reruns_only_failed_lines_and_keeps_earlier_output(env: tuple[Batches, FileStore, Storage]) -> None:
    store, files, storage = env
    batch_id, _ = new_batch(store, files, jsonl(lines(6)), chunk=2)
    store.ledger.commit_many(batch_id, [(i, "out", output_line(f"r{i}", 200, {"run": 1}), 0, 0) for i in range(4)])
    lost = ErrorInfo(code="worker_lost", message="died")
    store.ledger.commit_many(batch_id, [(i, "err", error_line(f"r{i}", lost), 0, 0) for i in (4, 5)])
    store.maybe_finalize(batch_id)
    retried: list[LinesUnit] = []
    assert store.retry(batch_id, None, retried.extend) == [4, 5]
    units = retried
    assert [(u.chunk, u.only) for u in units] == [(2, [4, 5])]
    store.ledger.commit_many(batch_id, [(i, "out", output_line(f"r{i}", 200, {"run": 2}), 0, 0) for i in (4, 5)])
    assert store.maybe_finalize(batch_id)
    raw = store.raw(batch_id)
    assert raw["status"] == "completed" and (raw["completed"], raw["failed"]) == ("6", "0")
    out = [json.loads(x) for x in storage.get_bytes(files.key(raw["output_file_id"])).splitlines()]
    assert sorted(o["custom_id"] for o in out) == [f"r{i}" for i in range(6)]


def test_mixed_models_split_into_units_per_model(env: tuple[Batches, FileStore, Storage]) -> None:
    store, files, _storage = env
    classify = {"task": "classify", "model": "tiny-sentiment", "text": "x"}
    rows = [*lines(2), {"custom_id": "c", "method": "POST", "url": "/v1/jobs", "body": classify}]
    _batch_id, units = new_batch(store, files, jsonl(rows), chunk=10)
    assert sorted((u.model, tuple(u.only or ())) for u in units) == [("tiny-gpt2", (0, 1)), ("tiny-sentiment", (2,))]


def test_an_all_bad_file_fails_validation(env: tuple[Batches, FileStore, Storage]) -> None:
    store, files, _storage = env
    batch_id, _ = new_batch(store, files, b"{bad\n[]\n")
    raw = store.raw(batch_id)
    assert raw["status"] == "failed" and raw["failed_at"] and raw["error_file_id"]
    with pytest.raises(LineError):
        raise LineError("x", "y")
    with pytest.raises(ModelNotFound):
        check(type("J", (), {"model": "nope", "task": "generate"})())


def test_default_retry_leaves_request_errors_and_all_reruns_them(env: tuple[Batches, FileStore, Storage]) -> None:
    store, files, _storage = env
    batch_id, _ = new_batch(store, files, jsonl(lines(6)), chunk=6)
    failures = {
        0: error_line("r0", ErrorInfo(code="invalid_input", message="bad body"), 400),
        1: error_line("r1", ErrorInfo(code="input_too_long", message="too long"), 422),
        2: error_line("r2", ErrorInfo(code="model_not_found", message="no such model"), 404),
        3: error_line("r3", ErrorInfo(code="quota_exceeded", message="over quota"), 429),  # retryable 4xx
        4: error_line("r4", ErrorInfo(code="worker_lost", message="died")),
    }
    store.ledger.commit_many(batch_id, [(i, "err", line, 0, 0) for i, line in failures.items()])
    store.ledger.commit_many(batch_id, [(5, "out", output_line("r5", 200, {}), 0, 0)])
    assert store.maybe_finalize(batch_id)
    assert store.retry(batch_id, None, [].extend) == [3, 4]
    store.ledger.commit_many(batch_id, [(i, "out", output_line(f"r{i}", 200, {}), 0, 0) for i in (3, 4)])
    assert store.maybe_finalize(batch_id)

    with pytest.raises(Conflict, match=r"nothing to retry.*3 failed lines are request errors.*all") as nothing:
        store.retry(batch_id, None, [].extend)
    assert nothing.value.http_status == 409
    with pytest.raises(Conflict, match=r"no failed line has an error code in \['worker_lost'\]"):
        store.retry(batch_id, {"worker_lost"}, [].extend)
    assert store.retry(batch_id, {"model_not_found"}, [].extend) == [2]
    store.ledger.commit_many(batch_id, [(2, "err", failures[2], 0, 0)])
    assert store.maybe_finalize(batch_id)
    assert store.retry(batch_id, None, [].extend, every=True) == [0, 1, 2]


def test_listing_is_strictly_newest_first_and_refuses_an_unknown_after(
    env: tuple[Batches, FileStore, Storage],
) -> None:
    store, files, _storage = env
    created = [new_batch(store, files, jsonl(lines(1)))[0] for _ in range(12)]  # well within one second
    rows, more = store.page("t1", None, 20)
    assert [r["id"] for r in rows] == created[::-1] and not more
    rows, more = store.page("t1", created[8], 3)
    assert [r["id"] for r in rows] == created[7:4:-1] and more
    with pytest.raises(NotFound, match=r"'batch_nope' not found.*last_id"):
        store.page("t1", "batch_nope", 3)
    with pytest.raises(NotFound):
        store.page("t2", created[0], 3)  # another tenant's id is as unknown as a made-up one


def test_the_batch_object_echoes_its_webhook_url(env: tuple[Batches, FileStore, Storage]) -> None:
    store, files, _storage = env
    f = files.create_bytes("t1", "in.jsonl", "batch", jsonl(lines(1)))
    body = BatchCreate(input_file_id=f.id, endpoint="/v1/jobs", webhook_url="https://hooks.example.com/qf")
    raw = store.create(body, "t1", TenantQuota(), check, lambda models: 4, [].extend)
    assert to_openai(raw)["webhook_url"] == "https://hooks.example.com/qf"
    plain = to_openai(store.raw(new_batch(store, files, jsonl(lines(1)))[0]))
    assert plain["webhook_url"] is None
