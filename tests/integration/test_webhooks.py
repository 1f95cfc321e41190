"""Batch webhooks on a real Redis, to real HTTP receivers on loopback addresses.

Receivers listen on 127.0.0.1 (and 127.0.0.2), which the egress policy refuses unless a test allows
it, as an operator would for an internal receiver. Signatures are checked with the
``standardwebhooks`` library.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trustme
from fastapi.testclient import TestClient
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from api.app import create_app
from queueformer.contract.errors import ModelNotFound
from queueformer.contract.openai_batch import BatchCreate, output_line
from queueformer.contract.settings import TenantQuota
from queueformer.server import keys
from queueformer.server.batches import Batches
from queueformer.server.connection import connect
from queueformer.server.egress import EgressPolicy, IPAddress, resolve
from queueformer.server.files import FileStore
from queueformer.server.storage import Storage
from queueformer.server.webhooks import Deliverer, DeliveryConfig, Outcome
from tests.conftest import free_port
from tests.helpers import eventually, jsonl, make_settings

WHSEC = "whsec_" + base64.b64encode(os.urandom(32)).decode()
LOOPBACK = ["127.0.0.1/32"]  # what an operator allows for a receiver inside the cluster
GOOD = {"custom_id": "a", "method": "POST", "url": "/v1/jobs", "body": {"task": "echo", "model": "echo", "text": "x"}}
BAD = {"custom_id": "b", "method": "POST", "url": "/v1/jobs", "body": {"task": "echo", "model": "nope", "text": "x"}}


# --- receivers --------------------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    """A real HTTP server: records every request and answers from a list of statuses (the last repeats)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        answers: tuple[int, ...] = (200,),
        location: str = "",
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.requests: list[Received] = []
        self.connections = 0
        self.answers = answers
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.requests.append(Received(self.path, headers, body, time.monotonic()))
                status = receiver.answers[min(len(receiver.requests), len(receiver.answers)) - 1]
                self.send_response(status)
                if location:
                    self.send_header("location", location)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request: Any, client_address: Any) -> None:
                receiver.connections += 1
                super().process_request(request, client_address)

        self.server = Server((host, port), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.host, self.port = host, self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SilentReceiver:
    """Accepts connections and never answers (or answers one byte every ``trickle_s``): a stuck receiver."""

    def __init__(self, trickle_s: float | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.held: list[socket.socket] = []
        self.trickle_s = trickle_s
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.held.append(conn)
            if self.trickle_s:
                threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        try:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
                time.sleep(self.trickle_s or 0)
                conn.sendall(bytes([byte]))
        except OSError:
            return

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


# --- the batch store and a deliverer ----------------------------------------------------------------


@dataclass
class Env:
    r: redis.Redis
    batches: Batches
    files: FileStore

    def batch(self, webhook_url: str | None, lines: list[dict[str, Any]], tenant: str = "t1") -> str:
        """Create a batch; all-bad lines fail it at validation (it ends at once)."""
        f = self.files.create_bytes(tenant, "in.jsonl", "batch", jsonl(lines))
        body = BatchCreate(input_file_id=f.id, endpoint="/v1/jobs", webhook_url=webhook_url)
        return self.batches.create(body, tenant, TenantQuota(), _known, lambda _: 4, lambda _: None)["id"]

    def stream(self, batch_id: str, kind: str = "webhook") -> list[dict[str, Any]]:
        entries = self.r.xrange(keys.events(batch_id))
        return [json.loads(e["data"]) for _, e in entries if e["type"] == kind]  # type: ignore[union-attr]

    def event(self, batch_id: str) -> dict[str, str]:
        event_id = self.r.hget(keys.batch(batch_id), "webhook_event")
        assert event_id, "no webhook event was queued"
        return self.r.hgetall(keys.webhook(str(event_id)))  # type: ignore[return-value]

    def due(self) -> list[str]:
        return self.r.zrange(keys.WEBHOOKS_DUE, 0, -1) + self.r.zrange(keys.WEBHOOKS_CLAIMED, 0, -1)  # type: ignore[operator]


def _known(job: Any) -> None:
    if job.model != "echo":
        raise ModelNotFound(f"model {job.model!r} is not registered", param="model")


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> Env:
    client = connect(redis_url)
    files = FileStore(client, Storage(f"file://{tmp_path}"))
    return Env(client, Batches(client, files.storage, files), files)


def deliverer(
    env: Env, allow: list[str] | None = None, secret: str | None = WHSEC, **config: Any
) -> tuple[Deliverer, list[Outcome]]:
    outcomes: list[Outcome] = []
    policy = EgressPolicy.from_allowlist(allow or [])
    d = Deliverer(env.r, secret, policy, DeliveryConfig(**config), on_outcome=outcomes.append)
    return d, outcomes


@pytest.fixture
def serving() -> Iterator[Callable[[Deliverer, int], None]]:
    """Run deliverers' loops in threads for a test, stopping them after."""
    running: list[tuple[Deliverer, threading.Thread]] = []

    def start(d: Deliverer, concurrency: int = 4) -> None:
        t = threading.Thread(target=d.serve, args=(concurrency, 0.05), daemon=True)
        t.start()
        running.append((d, t))

    yield start
    for d, t in running:
        d.stop()
        t.join(timeout=15)


# --- queued with the end -----------------------------------------------------------------------------


def test_every_end_of_a_batch_queues_its_event_in_the_same_step(env: Env, receiver: Receiver) -> None:
    url = receiver.url("/hook?token=abc")
    failed = env.batch(url, [BAD])
    event = env.event(failed)
    assert env.batches.raw(failed)["status"] == "failed"
    assert (event["url"], event["batch"], event["tenant"], event["type"]) == (url, failed, "t1", "batch.failed")
    assert (event["status"], event["attempts"]) == ("pending", "0")
    body = json.loads(event["body"])
    assert body == {
        "id": event["id"],
        "object": "event",
        "type": "batch.failed",
        "created_at": body["created_at"],
        "data": {"id": failed},
    }

    completed = env.batch(url, [GOOD, {**GOOD, "custom_id": "c"}])
    assert env.r.hget(keys.batch(completed), "webhook_event") is None  # running: nothing to say yet
    env.batches.ledger.commit_many(completed, [(i, "out", output_line(f"r{i}", 200, {}), 0, 0) for i in (0, 1)])
    assert env.batches.maybe_finalize(completed)
    assert env.event(completed)["type"] == "batch.completed"

    cancelled = env.batch(url, [GOOD])
    env.batches.cancel(cancelled)
    assert env.event(cancelled)["type"] == "batch.cancelled"
    assert sorted(env.due()) == sorted(env.event(b)["id"] for b in (failed, completed, cancelled))

    quiet = env.batch(None, [BAD])
    assert env.batches.raw(quiet)["status"] == "failed" and env.r.hget(keys.batch(quiet), "webhook_event") is None
    assert len(env.due()) == 3
    assert receiver.connections == 0  # ending a batch sends nothing by itself


# --- format ------------------------------------------------------------------------------------------


def test_the_api_delivers_a_signed_event_the_standardwebhooks_library_verifies(
    redis_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    api = {"webhook_secret": WHSEC, "webhook_allow": LOOPBACK, "reconcile_interval_s": 0}
    with TestClient(create_app(make_settings(redis_url, tmp_path, api=api))) as client:
        file_id = client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", jsonl([BAD]))})
        body = {"input_file_id": file_id.json()["id"], "endpoint": "/v1/jobs", "webhook_url": receiver.url()}
        batch = client.post("/v1/batches", json=body).json()
        assert batch["status"] == "failed"
        (got,) = eventually(lambda: receiver.requests, timeout=20)
        payload = Webhook(WHSEC).verify(got.body, got.headers)
        assert payload["type"] == "batch.failed" and payload["data"] == {"id": batch["id"]}
        assert got.headers["webhook-id"] == payload["id"] and got.headers["webhook-signature"].startswith("v1,")
        assert got.headers["content-type"] == "application/json" and got.path == "/hook"
        assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60
        with pytest.raises(WebhookVerificationError):
            Webhook("whsec_" + base64.b64encode(os.urandom(32)).decode()).verify(got.body, got.headers)
        r = connect(redis_url)

        def stream() -> list[dict[str, Any]]:
            entries = r.xrange(keys.events(batch["id"]))
            return [json.loads(e["data"]) for _, e in entries if e["type"] == "webhook"]  # type: ignore[union-attr]

        delivered = {"event_id": payload["id"], "attempt": 1, "outcome": "delivered", "status_code": 200}
        assert eventually(stream, timeout=10) == [delivered]
        metrics = client.get("/metrics").text
        assert 'queueformer_webhook_deliveries_total{outcome="delivered"}' in metrics
        assert "queueformer_webhooks_pending 0.0" in metrics


def test_a_plain_secret_from_before_still_signs_verifiably(env: Env, receiver: Receiver) -> None:
    d, _ = deliverer(env, LOOPBACK, secret="a-plain-secret-as-settings-held-before")
    env.batch(receiver.url(), [BAD])
    (done,) = d.run_due()
    assert done.outcome == "delivered"
    (got,) = receiver.requests
    Webhook("whsec_" + base64.b64encode(b"a-plain-secret-as-settings-held-before").decode()).verify(
        got.body, got.headers
    )


# --- off the request path ----------------------------------------------------------------------------


def test_a_receiver_that_never_answers_holds_no_request_and_no_other_tenant(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    silent = SilentReceiver()
    tenants = {"acme": "qf-acme-0123456789abcdef", "globex": "qf-globex-0123456789abcdef"}
    bootstrap = json.dumps([f"{t}:{k}" for t, k in tenants.items()])
    api = ApiProcess(redis_url, tmp_path, {"QUEUEFORMER_API__BOOTSTRAP_KEYS": bootstrap})
    try:
        base = api.start()
        acme = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {tenants['acme']}"}, timeout=120)
        globex = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {tenants['globex']}"}, timeout=120)
        up = acme.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", jsonl([BAD]))})
        body = {"input_file_id": up.json()["id"], "endpoint": "/v1/jobs", "webhook_url": silent.url()}
        job = globex.post("/v1/jobs", json={"task": "echo", "model": "echo", "text": "hi"}).json()["id"]

        def create() -> float:
            started = time.perf_counter()
            resp = acme.post("/v1/batches", json=body)
            assert resp.status_code == 200 and resp.json()["status"] == "failed", resp.text
            return time.perf_counter() - started

        single = [create() for _ in range(3)]
        reads: list[float] = []
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                assert globex.get(f"/v1/jobs/{job}").status_code == 200
                reads.append(time.perf_counter() - started)
                time.sleep(0.05)

        reader = threading.Thread(target=read)
        reader.start()
        with ThreadPoolExecutor(45) as pool:
            burst = list(pool.map(lambda _: create(), range(45)))
        time.sleep(1.0)  # and on a while, as the deliverer's attempts hang in the background
        stop.set()
        reader.join()
        with capsys.disabled():
            print(
                f"\nsilent receiver: POST /v1/batches {max(single):.2f}s; 45 at once, slowest {max(burst):.2f}s; "
                f"other tenant's reads meanwhile, slowest {max(reads):.2f}s of {len(reads)}"
            )
        # Sent synchronously, each request waited 3 attempts x 10 s (about 32 s) and reads stalled as long.
        assert max(single) < 5 and max(burst) < 10 and max(reads) < 5 and len(reads) >= 3
        eventually(lambda: silent.connections >= 1, timeout=10)  # the deliverer is at it, in the background
    finally:
        api.stop()
        silent.close()


def test_an_attempt_is_bounded_even_when_the_receiver_trickles(env: Env) -> None:
    trickling = SilentReceiver(trickle_s=0.05)  # a header byte every 50 ms: no read ever times out
    try:
        d, _ = deliverer(env, LOOPBACK, timeout_s=1.0, connect_timeout_s=0.5)
        env.batch(trickling.url(), [BAD])
        started = time.monotonic()
        (done,) = d.run_due()
        took = time.monotonic() - started
        assert done.outcome == "retrying" and "Timeout" in (done.error or ""), done
        assert took < 2.5, took
    finally:
        trickling.close()


# --- where it may go ---------------------------------------------------------------------------------


def test_loopback_and_private_targets_are_refused_logged_and_never_contacted(
    env: Env, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    p = receiver.port
    urls = [
        f"http://localhost:{p}/",
        f"http://127.0.0.1:{p}/",
        f"http://127.1:{p}/",
        f"http://0x7f.1:{p}/",
        f"http://2130706433:{p}/",
        f"http://[::ffff:127.0.0.1]:{p}/",
        f"http://[::1]:{p}/",
        f"http://169.254.169.254:{p}/latest/meta-data/",
        f"http://10.0.0.1:{p}/",
    ]
    batches = [env.batch(url, [BAD]) for url in urls]  # straight into the store: the API refuses most of them
    d, outcomes = deliverer(env)  # the default policy: public addresses only
    with caplog.at_level(logging.WARNING, logger="queueformer.server.webhooks"):
        done = d.run_due()
    assert sorted(o.outcome for o in done) == ["refused"] * len(urls) and len(outcomes) == len(urls)
    assert receiver.connections == 0
    assert env.due() == []  # never tried again
    for batch_id in batches:
        assert env.event(batch_id)["status"] == "refused"
        (entry,) = env.stream(batch_id)
        assert entry["outcome"] == "refused" and "public addresses only" in entry["error"]
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == len(urls)
    assert any("(loopback)" in m for m in refusals) and any("169.254.169.254 (link-local)" in m for m in refusals)
    assert all("meta-data" not in m for m in refusals)  # paths and queries (tokens) stay out of logs


def test_the_api_refuses_literal_private_targets_and_bad_urls_naming_the_field(redis_url: str, tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(redis_url, tmp_path, api={"reconcile_interval_s": 0}))) as client:
        up = client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", jsonl([GOOD]))})
        base = {"input_file_id": up.json()["id"], "endpoint": "/v1/jobs"}
        for url in (
            "http://127.0.0.1:6379/",
            "http://localhost/",
            "http://127.1/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://192.168.0.1/",
            "https://user:s3cr3t-pw@hooks.example.com/",
            "ftp://hooks.example.com/",
            "https://hooks.example.com/" + "x" * 2100,
        ):
            resp = client.post("/v1/batches", json={**base, "webhook_url": url})
            # A well-formed URL to a refused address is forbidden (403); a malformed one is invalid (422).
            refused = "@" not in url and url.startswith("http://") and len(url) < 100
            assert resp.status_code == (403 if refused else 422), (url, resp.text)
            error = resp.json()["error"]
            assert error["param"] == "webhook_url", error
            assert "s3cr3t-pw" not in resp.text
        assert client.get("/v1/batches").json()["data"] == []


def test_redirects_are_not_followed_even_to_an_allowed_address(env: Env) -> None:
    inside = Receiver(host="127.0.0.2")
    hops = [
        Receiver(answers=(302,), location=inside.url("/steal")),
        Receiver(answers=(307,), location="http://169.254.169.254/latest/meta-data/"),
        Receiver(answers=(301,), location="https://hooks.example.com/elsewhere"),
    ]
    try:
        d, _ = deliverer(env, ["127.0.0.0/8"])  # the redirect's target is allowed too: still not followed
        for hop in hops:
            env.batch(hop.url(), [BAD])
        done = d.run_due()
        assert [o.outcome for o in done] == ["retrying"] * 3
        assert all("redirects" in (o.error or "") and "are not followed" in (o.error or "") for o in done)
        assert [len(h.requests) for h in hops] == [1, 1, 1] and inside.connections == 0
    finally:
        for r in (inside, *hops):
            r.close()


def test_the_connection_goes_to_the_checked_address_with_the_names_host_and_tls(env: Env) -> None:
    ca = trustme.CA()
    calls: list[str] = []

    def dns(host: str, port: int) -> list[IPAddress]:
        calls.append(host)  # a second lookup (DNS rebinding's window) would show here
        return [ipaddress.ip_address("127.0.0.1")] if host == "hooks.example.test" else resolve(host, port)

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("hooks.example.test").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    plain = Receiver()
    tls = Receiver(tls=server_ctx)
    try:
        policy = EgressPolicy.from_allowlist(LOOPBACK, resolver=dns)
        d = Deliverer(env.r, WHSEC, policy, DeliveryConfig(), ssl_context=client_ctx)
        env.batch(f"http://hooks.example.test:{plain.port}/hook", [BAD])
        env.batch(f"https://hooks.example.test:{tls.port}/hook", [BAD])
        env.batch(f"https://127.0.0.1:{tls.port}/hook", [BAD])  # the certificate names another host
        done = sorted(d.run_due(), key=lambda o: o.outcome)
        assert [o.outcome for o in done] == ["delivered", "delivered", "retrying"], done
        assert "CERTIFICATE_VERIFY_FAILED" in (done[2].error or "") or "certificate" in (done[2].error or "").lower()
        assert calls == ["hooks.example.test", "hooks.example.test"]  # once per attempt, then pinned
        assert plain.requests[0].headers["host"] == f"hooks.example.test:{plain.port}"
        assert tls.requests[0].headers["host"] == f"hooks.example.test:{tls.port}"
    finally:
        plain.close()
        tls.close()


# --- retries and their budget ------------------------------------------------------------------------


def test_failed_attempts_are_retried_with_backoff_until_delivered(
    env: Env, serving: Callable[[Deliverer, int], None]
) -> None:
    flaky = Receiver(answers=(500, 503, 200))
    try:
        d, _ = deliverer(env, LOOPBACK, backoff_s=0.3)
        batch_id = env.batch(flaky.url(), [BAD])
        serving(d, 4)
        eventually(lambda: env.event(batch_id)["status"] == "delivered", timeout=20)
        first, second, third = flaky.requests
        assert first.headers["webhook-id"] == second.headers["webhook-id"] == third.headers["webhook-id"]
        for got in (first, second, third):
            Webhook(WHSEC).verify(got.body, got.headers)  # each attempt signs its own timestamp
        assert second.at - first.at >= 0.3 * 0.9 and third.at - second.at >= 0.6 * 0.9
        assert [(e["attempt"], e["outcome"], e.get("status_code")) for e in env.stream(batch_id)] == [
            (1, "retrying", 500),
            (2, "retrying", 503),
            (3, "delivered", 200),
        ]
        assert env.event(batch_id)["attempts"] == "3" and env.due() == []
        assert env.r.ttl(keys.webhook(env.event(batch_id)["id"])) > 0  # the record expires once done
    finally:
        flaky.close()


def test_retries_stop_at_the_attempt_budget_and_at_the_time_budget(
    env: Env, serving: Callable[[Deliverer, int], None]
) -> None:
    broken = Receiver(answers=(500,))
    try:
        by_count, outcomes = deliverer(env, LOOPBACK, backoff_s=0.05, max_attempts=3)
        counted = env.batch(broken.url("/count"), [BAD])
        serving(by_count, 4)
        eventually(lambda: env.event(counted)["status"] == "failed", timeout=20)
        time.sleep(0.3)
        assert [r.path for r in broken.requests] == ["/count"] * 3
        assert [o.outcome for o in outcomes] == ["retrying", "retrying", "failed"]
        last = {"event_id": env.event(counted)["id"], "attempt": 3, "outcome": "failed", "status_code": 500}
        assert env.stream(counted)[-1] == {**last, "error": "HTTP 500"}
        by_count.stop()

        by_time, _ = deliverer(env, LOOPBACK, backoff_s=0.2, max_attempts=1000, retry_for_s=1.0)
        timed = env.batch(broken.url("/time"), [BAD])
        started = time.monotonic()
        serving(by_time, 4)
        eventually(lambda: env.event(timed)["status"] == "failed", timeout=20)
        took = time.monotonic() - started
        tries = [r for r in broken.requests if r.path == "/time"]
        assert 2 <= len(tries) <= 4 and took < 3, (len(tries), took)  # 0.2 s doubling: gone before 1 s is out
        assert env.due() == []
    finally:
        broken.close()


def test_a_dead_processes_claims_are_sent_by_another(env: Env, receiver: Receiver) -> None:
    batch_id = env.batch(receiver.url(), [BAD])
    dead, _ = deliverer(env, LOOPBACK, claim_s=0.5)
    ((event_id, claim),) = dead.queue.claim(10, dead.owner, dead.config.lease_s)  # ...and it dies here
    alive, _ = deliverer(env, LOOPBACK)
    assert alive.run_due() == []  # claimed: no second attempt while the claim holds
    time.sleep(0.6)
    (done,) = alive.run_due()
    assert (done.event_id, done.outcome, done.attempt) == (event_id, "delivered", 2)
    assert len(receiver.requests) == 1
    assert not dead.queue.finish(event_id, claim, {"status": "failed"}, None, 60)  # a lapsed claim writes nothing
    assert env.event(batch_id)["status"] == "delivered"


def test_deliveries_survive_an_api_restart(redis_url: str, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there yet: the first attempt is a refused connection
    hook = f"http://127.0.0.1:{port}/hook"
    api = ApiProcess(redis_url, tmp_path, {"QUEUEFORMER_API__WEBHOOK_BACKOFF_S": "4"})
    r = connect(redis_url)
    base = api.start()
    up = httpx.post(f"{base}/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", jsonl([BAD]))})
    body = {"input_file_id": up.json()["id"], "endpoint": "/v1/jobs", "webhook_url": hook}
    batch = httpx.post(f"{base}/v1/batches", json=body).json()
    event_id = str(r.hget(keys.batch(batch["id"]), "webhook_event"))

    def retry_scheduled() -> bool:
        return r.zscore(keys.WEBHOOKS_DUE, event_id) is not None and r.hget(keys.webhook(event_id), "attempts") == "1"

    eventually(retry_scheduled, timeout=20)
    api.kill()  # SIGKILL between two attempts: the event lives on in Redis only
    receiver = Receiver(port=port)
    try:
        api.start()
        # The next attempt is due 4 s after the first. Should the kill have landed while the old process held
        # it claimed, the claim lapses first (one attempt's longest time plus a minute): the event is still
        # sent, later. Either way the failure message shows where the event stands.
        try:
            eventually(lambda: receiver.requests, timeout=DeliveryConfig(timeout_s=10.0).lease_s + 30)
        except AssertionError as exc:
            record = r.hgetall(keys.webhook(event_id))
            raise AssertionError(f"{exc}; event {record}; API log: {api.log.read_text()[-3000:]}") from None
        (got,) = receiver.requests
        assert Webhook(WHSEC).verify(got.body, got.headers)["id"] == event_id
        eventually(lambda: r.hget(keys.webhook(event_id), "status") == "delivered", timeout=10)
        assert r.hget(keys.webhook(event_id), "attempts") == "2"
    finally:
        api.stop()
        receiver.close()


# --- a real API process --------------------------------------------------------------------------------


class ApiProcess:
    """``uvicorn api.app:create_app`` in a subprocess, as deployed (one per replica)."""

    def __init__(self, redis_url: str, tmp: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.log = tmp / "api.log"
        self.env = {
            **os.environ,
            "QUEUEFORMER_REDIS_URL": redis_url,
            "QUEUEFORMER_DATA_DIR": str(tmp / "data"),
            "QUEUEFORMER_STORAGE_URL": f"file://{tmp / 'storage'}",
            "QUEUEFORMER_REGISTRY": "tiny",
            "QUEUEFORMER_API__AUTH_REQUIRED": "true" if "QUEUEFORMER_API__BOOTSTRAP_KEYS" in env else "false",
            "QUEUEFORMER_API__WEBHOOK_SECRET": WHSEC,
            "QUEUEFORMER_API__WEBHOOK_ALLOW": json.dumps(LOOPBACK),
            "QUEUEFORMER_API__RECONCILE_INTERVAL_S": "0",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        cmd = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--port", str(self.port)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{self.port}"

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        eventually(ready, timeout=60, interval=0.2)
        return base

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
