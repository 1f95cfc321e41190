"""Audits of open work against a real broker: lost messages are sent again, held ones never are."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.client import NEVER_DECODE

from queueformer.contract.errors import ErrorInfo
from queueformer.contract.ids import new_id
from queueformer.contract.openai_batch import BatchCreate, output_line
from queueformer.contract.registry import Registry
from queueformer.contract.settings import TenantQuota
from queueformer.contract.tasks import parse_job
from queueformer.contract.units import JobsUnit, LinesUnit
from queueformer.server import keys
from queueformer.server.batches import Batches
from queueformer.server.broker import make_celery, publish
from queueformer.server.files import FileStore
from queueformer.server.jobs import JobStore
from queueformer.server.ledger import Bitmap
from queueformer.server.reconcile import Reconciler, unit_key, unit_of
from queueformer.server.storage import Storage
from tests.helpers import jsonl, make_settings, messages, pop

QUEUE = "tiny-gpt2"


class Env:
    def __init__(self, redis_url: str, tmp_path: Path) -> None:
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)
        settings = make_settings(redis_url, tmp_path)
        self.registry = Registry.load("tiny")
        self.celery = make_celery(settings, self.registry)
        self.storage = Storage(f"file://{tmp_path / 'storage'}")
        self.files = FileStore(self.r, self.storage)
        self.jobs = JobStore(self.r)
        self.batches = Batches(self.r, self.storage, self.files)
        self.sent: list[tuple[JobsUnit | LinesUnit, str]] = []

    def reconciler(self, after_s: float = 0.0, confirm_s: float = 10.0) -> Reconciler:
        def send(unit: JobsUnit | LinesUnit, queue: str) -> None:
            self.sent.append((unit, queue))
            publish(self.celery, unit, queue)

        return Reconciler(
            self.r, self.jobs, self.batches, lambda model, tenant: QUEUE, send, after_s=after_s, confirm_s=confirm_s
        )

    def submit(self, n: int) -> list[str]:
        ids = [new_id("job") for _ in range(n)]
        spec = parse_job({"task": "generate", "model": "tiny-gpt2", "prompt": "hi"})
        self.jobs.create_many([(i, spec) for i in ids], tenant="t1", queue=dict.fromkeys(ids, QUEUE))
        publish(self.celery, JobsUnit(model="tiny-gpt2", ids=ids), QUEUE)
        return ids

    def batch(self, n: int, chunk: int) -> str:
        rows = [
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/jobs",
                "body": {"task": "generate", "model": "tiny-gpt2", "prompt": "x"},
            }
            for i in range(n)
        ]
        f = self.files.create_bytes("t1", "in.jsonl", "batch", jsonl(rows))
        body = BatchCreate(input_file_id=f.id, endpoint="/v1/jobs")

        def send(units: list[LinesUnit]) -> None:
            for unit in units:
                publish(self.celery, unit, QUEUE)

        return self.batches.create(body, "t1", TenantQuota(), lambda job: None, lambda models: chunk, send)["id"]

    def take(self) -> dict[str, Any]:
        """Pop a message the way a consumer does, and never record it: the delivery a SIGKILL loses."""
        raw = pop(self.r, QUEUE)
        assert raw is not None
        return json.loads(raw)

    def hold_unacked(self) -> dict[str, Any]:
        """Pop a message and record it as kombu does for a delivery a live worker is running."""
        payload = self.take()
        self.r.hset(keys.UNACKED, payload["properties"]["delivery_tag"], json.dumps([payload, QUEUE, QUEUE]))
        return payload

    def queued_units(self) -> list[dict[str, Any]]:
        return [u for m in messages(self.r, QUEUE) if (u := unit_of(json.loads(m))) is not None]


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> Env:
    return Env(redis_url, tmp_path)


def test_a_lost_job_message_is_sent_again_after_a_second_sighting(env: Env) -> None:
    ids = env.submit(3)
    lost = unit_of(env.take())
    assert lost is not None and lost["ids"] == ids
    rec = env.reconciler(confirm_s=10)

    first = rec.audit(now=1e10)
    assert first.suspects == 3 and first.resent_jobs == [] and env.r.hlen(keys.RECONCILE_SUSPECTS) == 3
    too_soon = rec.audit(now=1e10 + 5)
    assert too_soon.resent_jobs == []
    second = rec.audit(now=1e10 + 10)
    assert sorted(second.resent_jobs) == sorted(ids)
    assert [sorted(u["ids"]) for u in env.queued_units()] == [sorted(ids)]
    # the message is back: later audits leave it alone and forget the suspicion
    assert rec.audit(now=1e10 + 20).suspects == 0 and env.r.hlen(keys.RECONCILE_SUSPECTS) == 0


def test_queued_and_unacknowledged_messages_are_never_sent_again(env: Env) -> None:
    env.submit(2)
    env.submit(2)
    env.hold_unacked()  # one unit running on a live worker, one still queued
    rec = env.reconciler()
    for step in range(3):
        report = rec.audit(now=1e10 + 100 * step)
        assert report.checked_jobs == 4 and report.suspects == 0 and report.resent_jobs == []
    assert env.sent == []


def test_a_suspect_that_reappears_is_not_sent(env: Env) -> None:
    env.submit(1)
    payload = env.take()  # inside a consumer, between its pop and its unacked record
    rec = env.reconciler()
    assert rec.audit(now=1e10).suspects == 1
    env.r.hset(keys.UNACKED, payload["properties"]["delivery_tag"], json.dumps([payload, QUEUE, QUEUE]))
    assert rec.audit(now=1e10 + 60).resent_jobs == []
    assert env.sent == []


def test_finished_jobs_leave_the_open_index_and_young_ones_wait(env: Env) -> None:
    done, young = env.submit(2)
    env.take()
    env.jobs.start_many([done])
    env.jobs.succeed(done, "file:///r.json")
    assert env.r.zscore(keys.OPEN_JOBS, done) is None
    rec = env.reconciler(after_s=3600)
    assert rec.audit().checked_jobs == 0  # `young` was created just now
    env.jobs.fail(young, ErrorInfo(code="x", message="y"))
    assert env.r.zcard(keys.OPEN_JOBS) == 0


def test_lost_batch_chunks_are_sent_again_and_finished_ones_are_not(env: Env) -> None:
    batch_id = env.batch(10, chunk=4)  # chunks of lines 0-3, 4-7, 8-9
    lost = [LinesUnit.model_validate(unit_of(env.take())) for _ in range(3)]
    assert sorted(u.chunk for u in lost) == [0, 1, 2]
    entries = [(i, "out", output_line(f"r{i}", 200, {}), 0, 0) for i in (0, 1, 2, 3, 4)]
    env.batches.ledger.commit_many(batch_id, entries)  # chunk 0 done, chunk 1 started
    rec = env.reconciler()
    assert rec.audit(now=1e10).suspects == 2
    report = rec.audit(now=1e10 + 10)
    assert sorted(report.resent_units) == sorted(unit_key(u) for u in lost if u.chunk in (1, 2))
    assert sorted(u["chunk"] for u in env.queued_units()) == [1, 2]


def test_a_progressing_batch_is_not_audited(env: Env) -> None:
    batch_id = env.batch(8, chunk=4)
    env.take()
    env.batches.ledger.commit_many(batch_id, [(0, "out", output_line("r0", 200, {}), 0, 0)])
    assert env.reconciler(after_s=3600).audit().checked_units == 0


def test_one_auditor_at_a_time(env: Env) -> None:
    env.submit(1)
    lock = env.r.lock("qf:reconcile:lock", timeout=30)
    assert lock.acquire(blocking=False)
    try:
        assert env.reconciler().audit().skipped == "another process is auditing"
    finally:
        lock.release()


def test_committed_lines_are_counted_from_the_bitmap(env: Env) -> None:
    batch_id = env.batch(1, chunk=1)
    rnd = random.Random(7)
    bits = sorted(rnd.sample(range(3000), 700))
    p = env.r.pipeline()
    for b in bits:
        p.setbit(f"qf:batch:{batch_id}:done", b, 1)
    p.execute()
    done = Bitmap(env.r.execute_command("GET", f"qf:batch:{batch_id}:done", **{NEVER_DECODE: True}))
    for _ in range(300):
        first = rnd.randrange(0, 3000)
        last = rnd.randrange(first, 3100)
        assert done.count(first, last) == sum(first <= b <= last for b in bits)
    assert [done.has(i) for i in range(3100)] == [i in set(bits) for i in range(3100)]


def test_work_that_never_runs_ends_as_worker_lost_instead_of_looping(env: Env) -> None:
    (job,) = env.submit(1)
    batch_id = env.batch(3, chunk=3)
    rec = env.reconciler(confirm_s=10)
    now = 1e10
    for _ in range(3):  # sent again three times, and each time taken and never run
        while pop(env.r, QUEUE) is not None:
            pass
        rec.audit(now=now)
        report = rec.audit(now=now + 10)
        assert report.resent_jobs == [job] and len(report.resent_units) == 1
        now += 100
    while pop(env.r, QUEUE) is not None:
        pass
    rec.audit(now=now)
    report = rec.audit(now=now + 10)
    assert report.ended_jobs == [job] and len(report.ended_units) == 1 and not report.resent_jobs
    record = env.jobs.get(job)
    assert record.state.value == "failed" and record.error is not None and record.error.code == "worker_lost"
    raw = env.batches.raw(batch_id)
    assert raw["status"] == "completed" and raw["failed"] == "3"
    errors = [json.loads(line) for line in env.batches.partial_output(batch_id, errors=True).decode().splitlines()]
    assert sorted(e["custom_id"] for e in errors) == ["r0", "r1", "r2"]
    assert {e["error"]["code"] for e in errors} == {"worker_lost"}


def test_batches_whose_mover_died_are_moved_on(env: Env) -> None:
    old = str(int(time.time()) - 3600)
    finished = env.batch(2, chunk=2)  # every line committed, but the finalizer died before finalizing
    env.batches.ledger.commit_many(finished, [(i, "out", output_line(f"r{i}", 200, {}), 0, 0) for i in range(2)])
    env.r.hset(f"qf:batch:{finished}", mapping={"status": "finalizing", "finalizing_at": old})
    cancelling = env.batch(2, chunk=2)  # the API died inside the cancel
    env.r.hset(f"qf:batch:{cancelling}", mapping={"status": "cancelling", "cancelling_at": old})
    validating = env.batch(2, chunk=2)  # the API died while it validated the file
    env.r.hset(f"qf:batch:{validating}", mapping={"status": "validating", "created_at": old})
    while pop(env.r, QUEUE) is not None:
        pass
    report = env.reconciler(after_s=60).audit()
    assert sorted(report.tended_batches) == sorted([finished, cancelling, validating])
    status = {b: env.batches.raw(b)["status"] for b in (finished, cancelling, validating)}
    assert status == {finished: "completed", cancelling: "cancelled", validating: "failed"}
