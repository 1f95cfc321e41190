"""Tenant isolation of data, ids instead of paths, hostile batch files, quotas, expiry, keys, the overlay.

Two tenants with auth required and bootstrap keys, the API in-process on a real Redis. Every refusal is
a 4xx naming its field; another tenant's object answers exactly like one that does not exist.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.services import Services
from api.upkeep import Upkeep
from queueformer.cli import main as cli
from queueformer.client import Client
from queueformer.contract.jobs import FineTuneJob
from queueformer.contract.openai_batch import output_line
from queueformer.server import keys
from queueformer.server.batch_input import scan_file
from queueformer.server.checkpoints import Checkpoints
from queueformer.server.tenants import ApiKeys
from tests.helpers import eventually, jsonl, make_settings

A = {"Authorization": "Bearer qf-acme-bootstrap-key-0001"}
B = {"Authorization": "Bearer qf-globex-bootstrap-key-001"}
BOOTSTRAP = ["acme:qf-acme-bootstrap-key-0001", "globex:qf-globex-bootstrap-key-001"]
MISSING = "file-0123456789abcdef0123456789abcdef"
ECHO = {"custom_id": "r", "method": "POST", "url": "/v1/jobs", "body": {"task": "echo", "model": "echo", "text": "hi"}}


def app(redis_url: str, tmp_path: Path, **overrides: Any) -> TestClient:
    api = {"auth_required": True, "bootstrap_keys": BOOTSTRAP, "reconcile_interval_s": 0, **overrides.pop("api", {})}
    return TestClient(create_app(make_settings(redis_url, tmp_path, api=api, **overrides)))


@pytest.fixture
def c(redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    shared = f"file://{tmp_path / 'storage'}/shared/"
    with app(redis_url, tmp_path, training_data_uris=[shared]) as client:
        yield client


def services(client: TestClient) -> Services:
    s: Services = client.app.state.services  # type: ignore[attr-defined]
    return s


def upload(c: TestClient, who: dict[str, str], data: bytes, purpose: str = "batch", **form: Any) -> Any:
    return c.post("/v1/files", files={"file": ("f.jsonl", data)}, data={"purpose": purpose, **form}, headers=who)


def same_refusal(one: Any, other: Any, one_id: str, other_id: str) -> bool:
    """Two answers that differ in nothing but the id the caller sent."""
    return bool(
        one.status_code == other.status_code and one.text.replace(one_id, "X") == other.text.replace(other_id, "X")
    )


def finish_batch(s: Services, batch_id: str) -> dict[str, str]:
    """Commit every line of a batch as the echo worker would, then finalize it."""
    data = s.storage.get_bytes(s.files.key(s.batches.raw(batch_id)["input_file_id"]))
    lines = {i: line for i, line in enumerate(data.split(b"\n")) if line.strip()}
    done = s.batches.ledger.committed(batch_id, list(lines))  # the lines that failed validation
    entries = [
        (i, "out", output_line(json.loads(line)["custom_id"], 200, {"text": "hi"}), 0, 0)
        for i, line in lines.items()
        if i not in done
    ]
    s.batches.ledger.commit_many(batch_id, entries)
    assert s.batches.maybe_finalize(batch_id)
    return s.batches.raw(batch_id)


# --- 1. training data: only the caller's own files --------------------------------------------------


def test_a_tenant_cannot_train_on_or_probe_another_tenants_objects(c: TestClient) -> None:
    s = services(c)
    private = upload(c, A, jsonl([{"text": "acme's secret"}]), "fine-tune").json()["id"]
    batch_file = upload(c, A, jsonl([ECHO]), "batch").json()["id"]
    batch = c.post("/v1/batches", json={"input_file_id": batch_file, "endpoint": "/v1/jobs"}, headers=A).json()
    output = finish_batch(s, batch["id"])["output_file_id"]
    no_batch = "batch_0123456789abcdef0123456789abcdef"
    for method, path in (("get", ""), ("get", "/output"), ("post", "/cancel"), ("post", "/retry")):
        theirs = c.request(method, f"/v1/batches/{batch['id']}{path}", headers=B)
        assert theirs.status_code == 404, path
        assert same_refusal(
            theirs, c.request(method, f"/v1/batches/{no_batch}{path}", headers=B), batch["id"], no_batch
        )
    assert c.get("/v1/batches", headers=B).json()["data"] == [] and c.get("/v1/files", headers=B).json()["data"] == []

    def fine_tune(who: dict[str, str], ref: str) -> Any:
        return c.post("/v1/fine_tuning/jobs", json={"model": "tiny-gpt2", "training_file": ref}, headers=who)

    missing = fine_tune(B, MISSING)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "training_file"
    for foreign in (private, batch_file, output):  # acme's file, batch input and batch output
        assert same_refusal(fine_tune(B, foreign), missing, foreign, MISSING)
        native = c.post(
            "/v1/jobs", json={"task": "fine-tune", "model": "tiny-gpt2", "training_file": foreign}, headers=B
        )
        assert same_refusal(
            native,
            c.post("/v1/jobs", json={"task": "fine-tune", "model": "tiny-gpt2", "training_file": MISSING}, headers=B),
            foreign,
            MISSING,
        )
        for path in (f"/v1/files/{foreign}", f"/v1/files/{foreign}/content"):
            assert same_refusal(
                c.get(path, headers=B), c.get(path.replace(foreign, MISSING), headers=B), foreign, MISSING
            )

    # Storage URIs: refused with one answer whether the object exists or not, so nothing is learned.
    real = s.storage.uri(s.files.key(private))
    invented = s.storage.uri(s.files.key(MISSING))
    for who in (A, B):
        one, other = fine_tune(who, real), fine_tune(who, invented)
        assert one.status_code == 422 and one.json()["error"]["param"] == "training_file"
        assert same_refusal(one, other, real, invented)
    walk_out = f"{s.storage.url}/shared/../files/{private}"
    assert fine_tune(A, walk_out).status_code == 422
    # A tenant's own file of another purpose is not training data either.
    wrong = fine_tune(A, batch_file)
    assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "training_file"
    assert not s.redis.llen("fine-tune")  # nothing refused was queued

    # The owner trains on its file; the job keeps the id, never a storage path.
    job = fine_tune(A, private).json()
    assert job["training_file"] == private
    assert FineTuneJob.model_validate_json(s.jobs.raw(job["id"])["spec"]).training_file == private
    # Data the operator shares under an allowed prefix is open to every tenant.
    shared = s.storage.put_bytes("shared/corpus.jsonl", jsonl([{"text": "shared"}]))
    assert fine_tune(B, shared).status_code == 200
    gone = fine_tune(B, f"{s.storage.url}/shared/absent.jsonl")
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "training_file"


# --- 2. ids, not storage paths ---------------------------------------------------------------------


def test_clients_see_ids_and_api_paths_never_storage_paths(c: TestClient, tmp_path: Path) -> None:
    s = services(c)
    root = str(tmp_path / "storage")
    seen: list[str] = []

    def get(path: str, who: dict[str, str] = A, **kw: Any) -> Any:
        resp = c.get(path, headers=who, **kw)
        assert resp.status_code == 200, (path, resp.text)
        seen.append(resp.text)
        return resp

    job_id = c.post("/v1/jobs", json={"task": "echo", "model": "echo", "text": "hi"}, headers=A).json()["id"]
    s.jobs.start_many([job_id])
    s.jobs.finish_many([(job_id, s.storage.put_json(s.storage.result_key(job_id), {"text": "hi"}))])
    record = get(f"/v1/jobs/{job_id}").json()
    assert record["result_url"] == f"/v1/jobs/{job_id}/result" and "result_uri" not in record
    assert get(record["result_url"]).json() == {"text": "hi"}
    get("/v1/jobs")
    assert f'"result_url": "/v1/jobs/{job_id}/result"' in get(f"/v1/jobs/{job_id}/events").text

    fid = upload(c, A, jsonl([{"text": "x"}]), "fine-tune").json()["id"]
    ft = c.post("/v1/fine_tuning/jobs", json={"model": "tiny-gpt2", "training_file": fid}, headers=A).json()
    work = tmp_path / "ckpt"
    work.mkdir()
    (work / "weights.bin").write_bytes(b"w")
    Checkpoints(s.storage, ft["id"]).upload(work, 5, {"loss": 1.0, "saved_at": time.time()})
    # Events as older versions wrote them (with storage URIs) are cleaned on the way out.
    s.jobs.emit(ft["id"], "checkpoint", {"step": 5, "uri": s.storage.uri("checkpoints/x")})
    s.jobs.start_many([ft["id"]])
    s.jobs.finish_many([(ft["id"], s.storage.put_json(s.storage.result_key(ft["id"]), {"fine_tuned_model": "m"}))])
    ckpt = get(f"/v1/fine_tuning/jobs/{ft['id']}/checkpoints").json()["data"][0]
    assert ckpt["fine_tuned_model_checkpoint"] == f"{ft['planned_model_name']}:ckpt-step-5"
    assert get(f"/v1/fine_tuning/jobs/{ft['id']}").json()["training_file"] == fid
    events = get(f"/v1/fine_tuning/jobs/{ft['id']}/events").json()["data"]
    assert events[0]["data"]["result_url"] == f"/v1/jobs/{ft['id']}/result"
    get(f"/v1/jobs/{ft['id']}/events")
    get("/v1/fine_tuning/jobs")
    get("/v1/models")
    get("/v1/files")

    # A job recorded by an older version kept the resolved URI: it is shown as the file id.
    legacy = FineTuneJob(model="tiny-gpt2", training_file=s.storage.uri(s.files.key(fid)))
    s.jobs.create_many([("job-legacyuri0001", legacy)], tenant="acme", queue={"job-legacyuri0001": "fine-tune"})
    assert get("/v1/fine_tuning/jobs/job-legacyuri0001").json()["training_file"] == fid

    leaks = [text for text in seen if root in text or "file://" in text]
    assert leaks == []


# --- 3. hostile batch input files ------------------------------------------------------------------


def test_hostile_batch_files_are_refused_cheaply_with_a_clear_answer(c: TestClient) -> None:
    s = services(c)

    def create(data: bytes) -> Any:
        fid = upload(c, A, data).json()["id"]
        return c.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/jobs"}, headers=A)

    # Blank lines count: a file of newlines is refused at the line limit, not walked to its end.
    newlines = create(b"\n" * (8 << 20))
    err = newlines.json()["error"]
    assert newlines.status_code == 413 and err["param"] == "input_file_id" and "50000 lines" in err["message"]
    assert s.batches.open_count("acme") == 0

    # One line over the byte cap is a per-line error; the batch has nothing else, so it fails.
    one_line = create(b"x" * (4 << 20)).json()
    assert one_line["status"] == "failed"
    codes = [(e["code"], e["line"], e["param"]) for e in one_line["errors"]["data"]]
    assert ("line_too_long", 1, "line") in codes

    # Around good lines: they run, and no chunk's byte range holds the long line.
    good = jsonl([{**ECHO, "custom_id": "a"}])
    mixed = create(good + b"y" * (2 << 20) + b"\n" + jsonl([{**ECHO, "custom_id": "b"}])).json()
    assert mixed["status"] == "in_progress" and mixed["request_counts"] == {"total": 3, "completed": 0, "failed": 1}
    long_start, long_end = len(good), len(good) + (2 << 20) + 1
    for chunk in s.batches.ledger.chunks(mixed["id"]):
        assert chunk.end <= long_start or chunk.start >= long_end
    errors = s.storage.get_bytes(s.files.key(finish_batch(s, mixed["id"])["error_file_id"]))
    line = json.loads(errors)
    assert line["custom_id"] == "line-2" and line["response"]["body"]["error"]["code"] == "line_too_long"


def test_an_over_long_line_is_never_held_whole(c: TestClient) -> None:
    s = services(c)
    fid = s.files.create_bytes("acme", "big.jsonl", "batch", b"z" * (32 << 20)).id
    tracemalloc.start()
    try:
        scan = scan_file(s.storage, s.files.key(fid), "/v1/jobs", 50_000, max_line_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [e.code for _, _, e in scan.errors] == ["line_too_long"]
    assert peak < 8 << 20, f"scanning a 32 MiB line allocated {peak >> 20} MiB at its peak"


# --- 4. storage quota and expiry -------------------------------------------------------------------


def test_storage_quota_counts_uploads_and_outputs_and_deletes_give_bytes_back(redis_url: str, tmp_path: Path) -> None:
    with app(redis_url, tmp_path, quota={"max_stored_bytes": 1000}) as c:
        s = services(c)
        first = upload(c, A, b"a" * 600)
        assert first.status_code == 200 and s.files.stored_bytes("acme") == 600
        over = upload(c, A, b"b" * 600)
        err = over.json()["error"]
        assert over.status_code == 413 and err["code"] == "storage_quota_exceeded" and err["param"] == "file"
        assert "1000 bytes" in err["message"] and err["limit"] == 1000 and err["stored_bytes"] == 600
        assert s.files.stored_bytes("acme") == 600 and len(c.get("/v1/files", headers=A).json()["data"]) == 1
        assert upload(c, B, b"c" * 600).status_code == 200  # the quota is per tenant
        assert c.delete(f"/v1/files/{first.json()['id']}", headers=A).json()["deleted"]
        assert c.delete(f"/v1/files/{first.json()['id']}", headers=A).status_code == 404
        assert s.files.stored_bytes("acme") == 0

        # Produced batch output counts too: it is the tenant's data in storage.
        fid = upload(c, A, jsonl([ECHO])).json()["id"]
        batch = c.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/jobs"}, headers=A).json()
        out = finish_batch(s, batch["id"])["output_file_id"]
        size = c.get(f"/v1/files/{out}", headers=A).json()["bytes"]
        assert s.files.stored_bytes("acme") == len(jsonl([ECHO])) + size


def test_files_expire_as_openai_asks_and_the_sweep_deletes_them(redis_url: str, tmp_path: Path) -> None:
    with app(redis_url, tmp_path, quota={"file_expiry_s": 7200}) as c:
        s = services(c)
        form = {"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"}
        f = upload(c, A, b"{}\n", **form).json()
        assert f["expires_at"] == f["created_at"] + 3600
        default = upload(c, A, b"{}\n").json()
        assert default["expires_at"] == default["created_at"] + 7200  # the operator's default
        for bad, param in (
            ({**form, "expires_after[seconds]": "100"}, "expires_after[seconds]"),
            ({**form, "expires_after[seconds]": "2592001"}, "expires_after[seconds]"),
            ({**form, "expires_after[anchor]": "last_active_at"}, "expires_after[anchor]"),
        ):
            resp = upload(c, A, b"{}\n", **bad)
            assert resp.status_code == 422 and resp.json()["error"]["param"] == param, (bad, resp.text)
        # created_at is the only anchor: seconds alone mean the same, an anchor alone keeps the default.
        alone = upload(c, A, b"{}\n", **{"expires_after[seconds]": "3600"}).json()
        assert alone["expires_at"] == alone["created_at"] + 3600
        anchor = upload(c, A, b"{}\n", **{"expires_after[anchor]": "created_at"}).json()
        assert anchor["expires_at"] == anchor["created_at"] + 7200
        for extra in (alone, anchor):
            assert c.delete(f"/v1/files/{extra['id']}", headers=A).status_code == 200

        # The OpenAI SDK's own encoding of expires_after and output_expires_after.
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=A["Authorization"][7:], http_client=c)
        sdk_file = sdk.files.create(
            file=("in.jsonl", jsonl([ECHO])), purpose="batch", expires_after={"anchor": "created_at", "seconds": 86400}
        )
        assert sdk_file.expires_at == sdk_file.created_at + 86400
        batch = sdk.batches.create(
            input_file_id=sdk_file.id,
            endpoint="/v1/jobs",  # type: ignore[arg-type]
            completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 3600},
        )
        out = sdk.files.retrieve(finish_batch(s, batch.id)["output_file_id"])
        assert out.expires_at == out.created_at + 3600
        qf = Client("http://testserver")
        qf.http.close()
        qf.http = c  # queueformer's own SDK over the same in-process app
        c.headers.update(A)
        mine = qf.upload(b"{}\n", expires_after_s=86400)
        assert mine["expires_at"] == mine["created_at"] + 86400

        # An expired file answers 404 at once, before any sweep.
        stale = s.files.create_bytes("acme", "old.jsonl", "batch", b"{}\n", expires_after_s=-1).id
        assert c.get(f"/v1/files/{stale}", headers=A).status_code == 404
        assert stale not in [x["id"] for x in c.get("/v1/files", headers=A).json()["data"]]

        # The sweep deletes what expired from storage and Redis, and gives the bytes back.
        before = s.files.stored_bytes("acme")
        swept = Upkeep(s).sweep(now=time.time() + 3601)
        assert set(swept) == {f["id"], stale, out.id}
        for gone in swept:
            assert not s.redis.exists(keys.file(gone)) and not s.storage.exists(s.files.key(gone))
            assert c.get(f"/v1/files/{gone}/content", headers=A).status_code == 404
        assert s.files.stored_bytes("acme") == before - 3 - 3 - out.bytes
        assert c.get(f"/v1/files/{default['id']}", headers=A).status_code == 200  # not due yet
        assert s.redis.zcard(keys.FILE_EXPIRY) == 3  # the default-expiry upload and the two SDK uploads


def test_the_upkeep_thread_sweeps_expired_files_by_itself(redis_url: str, tmp_path: Path) -> None:
    with app(redis_url, tmp_path, api={"file_sweep_interval_s": 0.2}) as c:
        s = services(c)
        stale = s.files.create_bytes("acme", "old.jsonl", "batch", b"{}\n", expires_after_s=-1).id
        eventually(lambda: not s.redis.exists(keys.file(stale)), timeout=10)
        assert not s.storage.exists(s.files.key(stale)) and s.files.stored_bytes("acme") == 0


# --- 5. API keys -----------------------------------------------------------------------------------


def test_keys_list_and_revoke(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setenv("QUEUEFORMER_REDIS_URL", redis_url)
    monkeypatch.setenv("QUEUEFORMER_API__BOOTSTRAP_KEYS", json.dumps(BOOTSTRAP[:1]))
    assert cli(["keys", "create", "--tenant", "acme"]) == 0
    first = capsys.readouterr().out.strip()
    assert cli(["keys", "create", "--tenant", "globex"]) == 0
    second = capsys.readouterr().out.strip()

    assert cli(["keys", "list", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["tenant"], r["source"]) for r in rows} == {("acme", "redis"), ("globex", "redis"), ("acme", "settings")}
    assert all(r["id"].startswith("key_") for r in rows)
    issued = [r for r in rows if r["source"] == "redis"]
    assert {r["prefix"] for r in issued} == {first[:7], second[:7]} and all(r["created_at"] for r in issued)
    assert first not in json.dumps(rows) and second not in json.dumps(rows)  # never the key
    assert cli(["keys", "list", "--tenant", "globex"]) == 0
    table = capsys.readouterr().out
    assert "globex" in table and "acme" not in table and second not in table

    with app(redis_url, tmp_path) as c:
        assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {first}"}).status_code == 200
        globex_id = next(r["id"] for r in rows if r["tenant"] == "globex")
        assert cli(["keys", "revoke", globex_id]) == 0  # by id
        assert cli(["keys", "revoke", first]) == 0  # by the key itself
        assert "revoked" in capsys.readouterr().out
        for key in (first, second):  # at once, on the next request
            assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert ApiKeys(redis.Redis.from_url(redis_url, decode_responses=True)).list() == []

    # Errors are one plain line, never a traceback.
    for argv in (["keys", "revoke", "qf-no-such-key"], ["keys", "revoke", "key_0123456789abcdef"]):
        assert cli(argv) == 1
    assert cli(["keys", "revoke", BOOTSTRAP[0].split(":", 1)[1]]) == 1
    assert cli(["keys", "create", "--tenant", "Not A Tenant"]) == 1
    monkeypatch.setenv("QUEUEFORMER_REDIS_URL", "redis://127.0.0.1:1/0")
    assert cli(["keys", "list"]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("queueformer keys: ") for line in lines), err
    assert "Traceback" not in err and "QUEUEFORMER_API__BOOTSTRAP_KEYS" in lines[2]


# --- 6. run-time registry entries from Redis --------------------------------------------------------


def test_hostile_registry_entries_in_redis_are_never_honoured_by_the_api(c: TestClient) -> None:
    s = services(c)
    good = s.storage.uri(s.storage.model_key("ftm-0123456789ab"))
    base = {"task": "generate", "base_model": "tiny-gpt2", "tenant": "acme"}
    hostile = {
        "ft:tiny-gpt2:remote:0123456789ab": {**base, "path": good, "trust_remote_code": True, "queue": "tiny-gpt2"},
        "ft:tiny-gpt2:hub:0123456789ab": {**base, "hub_id": "someone/evil"},
        "ft:tiny-gpt2:path:0123456789ab": {**base, "path": "file:///etc"},
        "tiny-gpt2-copy": {**base, "path": good},
    }
    for name, body in hostile.items():
        s.redis.hset(keys.MODELS, name, json.dumps({"name": name, **body}))
    s.redis.hset(keys.MODELS, "ft:tiny-gpt2:junk:0123456789ab", "{not json")

    listed = {m["id"] for m in c.get("/v1/models", headers=A).json()["data"]}
    assert "ft:tiny-gpt2:remote:0123456789ab" in listed and not listed & (
        set(hostile) - {"ft:tiny-gpt2:remote:0123456789ab"}
    )
    entry = s.registry().get("ft:tiny-gpt2:remote:0123456789ab")
    assert entry.trust_remote_code is False and entry.queue == "fine-tuned"  # not the base model's queue
    for name in (*hostile, "ft:tiny-gpt2:junk:0123456789ab"):
        resp = c.post("/v1/jobs", json={"task": "generate", "model": name, "prompt": "x"}, headers=A)
        if name == "ft:tiny-gpt2:remote:0123456789ab":
            assert resp.status_code == 202 and s.redis.llen("fine-tuned") == 1
        else:
            assert resp.status_code == 404 and resp.json()["error"]["param"] == "model", name
