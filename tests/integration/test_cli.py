"""The ``queueformer`` command as a user runs it: a real ``queueformer up`` in a fresh directory, then
every other command as its own process, finding that cluster through the file ``up`` writes.

No command may answer with a traceback: failures are one or two plain lines, exit status 2 for what
the user typed and 1 for what happened at run time.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.helpers import eventually

REGISTRY = """\
models:
  tiny-gpt2:
    task: generate
    path: tiny-gpt2
    dtype: float32
    device_map: cpu
    max_batch_size: 16
    max_input_tokens: 256
  echo:
    task: echo
    max_batch_size: 64
  broken:
    task: generate
    path: no-such-model
"""


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return [x for x in self.err.splitlines() if x.strip()]


@dataclass
class Up:
    home: Path  # the directory `queueformer up` ran in; commands run there too
    env: dict[str, str]
    url: str

    def cli(self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 120) -> Run:
        done = subprocess.run(
            [sys.executable, "-m", "queueformer.cli", *args],
            cwd=self.home,
            env={**self.env, **(env or {})},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        run = Run(done.returncode, done.stdout, done.stderr)
        assert "Traceback" not in run.out + run.err, (args, run)
        return run


def _user_env(tiny_models: Path, registry: Path) -> dict[str, str]:
    """A user's shell: none of the variables that would point commands at a cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUEFORMER_")}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    # The registry and models are this test's; the Redis, its URL and the API's address are left to `up`.
    return {**env, "QUEUEFORMER_REGISTRY": str(registry), "QUEUEFORMER_MODELS_DIR": str(tiny_models)}


@pytest.fixture(scope="module")
def up(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    home = tmp_path_factory.mktemp("home")
    registry = home / "models.yaml"
    registry.write_text(REGISTRY)
    env = _user_env(tiny_models, registry)
    port = free_port()
    log = open(home / "up.log", "wb")  # noqa: SIM115 - closed below, after the process
    cmd = [sys.executable, "-m", "queueformer.cli", "up", "--port", str(port), "--flower-port", str(free_port())]
    proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, (home / "up.log").read_text()
            return "queueformer is up" in (home / "up.log").read_text()

        eventually(ready, timeout=240, interval=0.5)
        yield Up(home, env, url)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_up_writes_where_its_cluster_answers_for_this_user_only(up: Up) -> None:
    path = up.home / ".queueformer" / "cluster.json"
    info = json.loads(path.read_text())
    assert info["url"] == up.url and info["redis_url"].startswith("redis://")
    assert info["flower_auth"].startswith("admin:") and info["flower_url"].startswith("http://127.0.0.1:")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_model_that_cannot_load_is_named_with_what_to_do_and_the_rest_runs(up: Up) -> None:
    said = (up.home / "up.log").read_text()
    warning = next(line for line in said.splitlines() if line.startswith("warning: model entry 'broken'"))
    assert "no-such-model does not exist" in warning and "queueformer models build-tiny" in warning, warning
    assert "Traceback" not in said
    ran = up.cli("submit", '{"task":"generate","model":"tiny-gpt2","prompt":"Hi","max_new_tokens":2}', "--wait")
    assert ran.code == 0 and json.loads(ran.out)["generations"], ran


def test_commands_find_the_cluster_on_their_own_and_take_either_url_form(up: Up) -> None:
    first = up.cli("submit", '{"task":"echo","model":"echo","text":"hello"}', "--wait")
    assert first.code == 0 and json.loads(first.out)["text"] == "hello", first
    job_id = json.loads(up.cli("submit", '{"task":"echo","model":"echo","text":"again"}').out)["id"]
    for url in (up.url, up.url + "/v1", up.url + "/v1/"):
        shown = up.cli("status", job_id, "--url", url)
        assert shown.code == 0 and json.loads(shown.out)["id"] == job_id, (url, shown)
    listed = up.cli("jobs", "list")
    assert listed.code == 0 and job_id in listed.out and "echo" in listed.out, listed
    assert json.loads(up.cli("jobs", "list", "--json", "--limit", "1").out.splitlines()[0])["id"] == job_id


def test_keys_find_the_redis_of_up_without_configuration(up: Up) -> None:
    created = up.cli("keys", "create", "--tenant", "acme")
    assert created.code == 0 and created.out.startswith("qf-"), created
    key = created.out.strip()
    listed = up.cli("keys", "list")
    assert listed.code == 0 and "acme" in listed.out, listed
    # The key selects its tenant: acme has no batches yet, the default tenant's are not shown.
    assert up.cli("batch", "list", "--api-key", key).out.strip() == "no batches yet"
    revoked = up.cli("keys", "revoke", key)
    assert revoked.code == 0 and "acme" in revoked.out, revoked
    again = up.cli("keys", "revoke", key)
    assert again.code == 1 and len(again.lines) <= 2, again


def test_errors_are_one_or_two_plain_lines_with_what_to_do(up: Up, tmp_path: Path) -> None:
    bad_json = up.cli("submit", '{"task": "echo",')
    assert bad_json.code == 2 and "not valid JSON" in bad_json.err and len(bad_json.lines) <= 2, bad_json
    assert up.cli("submit", stdin="").code == 2

    unknown = up.cli("submit", '{"task":"generate","model":"no-such-model","prompt":"Hi"}')
    assert unknown.code == 1 and "model_not_found" in unknown.err and "models list" in unknown.err, unknown
    assert len(unknown.lines) == 2

    missing = up.cli("run", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "out.jsonl"))
    assert missing.code == 2 and "does not exist" in missing.err and len(missing.lines) <= 2, missing

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "fine"}\n{"prompt": \n')
    bad_line = up.cli("run", str(broken), "-o", str(tmp_path / "out.jsonl"), "--model", "tiny-gpt2")
    assert bad_line.code == 2 and "line 2 is not valid JSON" in bad_line.err, bad_line

    down = up.cli("batch", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert down.code == 1 and "cannot reach" in down.err and "queueformer up" in down.err, down
    assert len(down.lines) == 2

    wrong_path = up.cli("status", "job-abc", "--url", up.url + "/api")
    assert wrong_path.code == 1 and "not a queueformer API" in wrong_path.err, wrong_path

    not_a_url = up.cli("jobs", "list", "--url", "localhost:8000")
    assert not_a_url.code == 2 and "--url" in not_a_url.err and len(not_a_url.lines) <= 2, not_a_url

    gone = up.cli("status", "job-doesnotexist")
    assert gone.code == 1 and "not_found" in gone.err and len(gone.lines) <= 2, gone

    usage = up.cli("batch", "retry")
    assert usage.code == 2 and "usage:" in usage.err

    debug = subprocess.run(
        [sys.executable, "-m", "queueformer.cli", "--debug", "submit", "{"],
        cwd=up.home,
        env=up.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert debug.returncode == 2 and "Traceback" in debug.stderr  # asked for


def test_help_names_the_url_default_and_the_run_line_formats(up: Up) -> None:
    status_help = up.cli("status", "--help").out
    assert "QUEUEFORMER_URL" in status_help and "http://127.0.0.1:8000" in status_help and "/v1" in status_help
    run_help = up.cli("run", "--help").out
    for words in ("custom_id", "/v1/chat/completions", '{"prompt": "The weather today"}', "status_code", "line-N"):
        assert words in run_help, words


def test_run_counts_failures_by_reason_and_writes_openai_lines_for_openai_input(up: Up, tmp_path: Path) -> None:
    lines = [
        {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "tiny-gpt2", "prompt": "Hi"}},
        {"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"model": "nope", "prompt": "Hi"}},
        {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"model": "nope", "prompt": "Yo"}},
        {"custom_id": "d", "method": "POST", "url": "/v1/completions", "body": {"model": "tiny-gpt2", "prompt": 5}},
    ]
    for line in lines:
        line["body"]["max_tokens"] = 4
    src = tmp_path / "openai.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    ran = up.cli("run", str(src), "-o", str(out))
    assert ran.code == 1 and "1/4 succeeded, 3 failed" in ran.out, ran
    table = ran.out.split("REASON", 1)[1]
    assert "2  model_not_found" in table and "b: " in table, ran.out
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == ["a", "b", "c", "d"]
    assert all(set(r) == {"id", "custom_id", "response", "error"} for r in rows), rows
    assert rows[0]["response"]["status_code"] == 200 and rows[0]["response"]["body"]["object"] == "text_completion"
    failed = rows[1]["response"] or {}
    assert failed.get("status_code", 0) >= 400 and failed["body"]["error"]["code"] == "model_not_found", rows[1]

    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"text": "one"}\n{"text": "two", "custom_id": "x"}\n')
    ok = up.cli("run", str(plain), "-o", str(out), "--model", "echo", "--task", "echo")
    assert ok.code == 0 and "2/2 succeeded" in ok.out and "REASON" not in ok.out, ok
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["custom_id"], r["status"], r["response"]["text"]) for r in rows] == [
        ("line-1", "ok", "one"),
        ("x", "ok", "two"),
    ]


def test_batch_commands_list_show_wait_fetch_retry_and_cancel(up: Up, tmp_path: Path) -> None:
    src = tmp_path / "batch.jsonl"
    body = {"task": "echo", "model": "echo", "text": "hi"}
    src.write_text(
        "".join(
            json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/jobs", "body": body}) + "\n"
            for i in range(3)
        )
    )
    created = up.cli("batch", "create", str(src))
    assert created.code == 0, created
    batch_id = json.loads(created.out)["id"]

    listed = up.cli("batch", "list")
    assert listed.code == 0 and listed.out.splitlines()[1].startswith(batch_id), listed
    waited = up.cli("batch", "wait", batch_id)
    assert waited.code == 0 and json.loads(waited.out)["status"] == "completed", waited
    shown = up.cli("batch", "status", batch_id)
    assert json.loads(shown.out)["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert json.loads(up.cli("status", batch_id).out)["id"] == batch_id  # a batch id works for `status` too
    results = up.cli("batch", "results", batch_id)
    assert sorted(json.loads(x)["custom_id"] for x in results.out.splitlines()) == ["r0", "r1", "r2"]

    nothing = up.cli("batch", "retry", batch_id)
    assert nothing.code == 1 and "nothing to retry" in nothing.err and "HTTP 409" in nothing.err, nothing
    assert len(nothing.lines) <= 2
    finished = up.cli("batch", "cancel", batch_id)
    assert finished.code == 1 and "conflict" in finished.err and len(finished.lines) <= 2, finished

    slow = tmp_path / "slow.jsonl"
    gen = {"model": "tiny-gpt2", "prompt": "The weather today", "max_tokens": 200}
    slow.write_text(
        "".join(
            json.dumps({"custom_id": f"s{i}", "method": "POST", "url": "/v1/completions", "body": gen}) + "\n"
            for i in range(64)
        )
    )
    slow_id = json.loads(up.cli("batch", "create", str(slow)).out)["id"]
    cancelled = up.cli("batch", "cancel", slow_id)
    assert cancelled.code == 0 and json.loads(cancelled.out)["status"] in ("cancelling", "cancelled"), cancelled
    assert eventually(lambda: json.loads(up.cli("batch", "status", slow_id).out)["status"] == "cancelled", 120)
    newest = [json.loads(x)["id"] for x in up.cli("batch", "list", "--json", "--limit", "2").out.splitlines()]
    assert newest == [slow_id, batch_id]
    unknown = up.cli("batch", "list", "--after", "batch_0123456789")
    assert unknown.code == 1 and "not_found" in unknown.err and "after" in unknown.err, unknown
    assert up.cli("batch", "list", "--limit", "1").out.splitlines()[-1].startswith("more: queueformer batch list")
