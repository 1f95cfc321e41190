"""What a webhook receiver that never answers costs the API: ``python -m bench.webhook_stall``.

One tenant creates batches whose end webhook points at a receiver that accepts connections and never
answers; another tenant reads a job the whole time. Measured against a real uvicorn API (a subprocess
run from ``--tree``, so an older checkout can be measured with the same script) and a real Redis:

* the time of one ``POST /v1/batches`` (the batch fails validation at once, so it ends, and its
  webhook is due, inside the request);
* 45 such requests at once, and the other tenant's ``GET /v1/jobs/{id}`` latency meanwhile.

The receiver is on 127.0.0.1, allowed through ``QUEUEFORMER_API__WEBHOOK_ALLOW`` (refused otherwise).
Prints a table and writes ``bench/results/webhook_stall.json`` (under ``--label``, default
``current``). Redis is an embedded Valkey unless ``--redis-url`` names a database (flushed).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.common import RESULTS, free_port, percentile, say, table

KEYS = {"a": "qf-bench-tenant-a-0123456789", "b": "qf-bench-tenant-b-0123456789"}


class HangingReceiver:
    """Accepts TCP connections and never answers; counts them."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def _start_api(tree: Path, redis_url: str, tmp: Path, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "QUEUEFORMER_REDIS_URL": redis_url,
        "QUEUEFORMER_DATA_DIR": str(tmp / "data"),
        "QUEUEFORMER_STORAGE_URL": f"file://{tmp / 'storage'}",
        "QUEUEFORMER_REGISTRY": "tiny",
        "QUEUEFORMER_API__AUTH_REQUIRED": "true",
        "QUEUEFORMER_API__BOOTSTRAP_KEYS": json.dumps([f"{t}:{k}" for t, k in KEYS.items()]),
        "QUEUEFORMER_API__WEBHOOK_SECRET": "whsec_" + "A" * 43 + "=",
        "QUEUEFORMER_API__WEBHOOK_ALLOW": '["127.0.0.1/32"]',
        "QUEUEFORMER_API__RECONCILE_INTERVAL_S": "0",
        "PYTHONPATH": str(tree),
    }
    cmd = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--port", str(port), "--log-level"]
    proc = subprocess.Popen([*cmd, "warning"], cwd=tree, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the API did not become ready")


def run(tree: Path, redis_url: str, concurrent: int = 45) -> dict[str, Any]:
    redis.Redis.from_url(redis_url).flushdb()
    receiver = HangingReceiver()
    hook = f"http://127.0.0.1:{receiver.port}/hook"
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = _start_api(tree, redis_url, Path(tmp), port)
        try:
            base = f"http://127.0.0.1:{port}"
            a = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEYS['a']}"}, timeout=120)
            b = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEYS['b']}"}, timeout=120)
            # Every line names an unknown model: the batch fails validation, ending inside the request.
            line = {"custom_id": "x", "method": "POST", "url": "/v1/jobs", "body": {"task": "echo", "model": "nope"}}
            files = {"file": ("in.jsonl", json.dumps(line).encode() + b"\n")}
            file_id = a.post("/v1/files", data={"purpose": "batch"}, files=files).json()["id"]
            job_id = b.post("/v1/jobs", json={"task": "echo", "model": "echo", "text": "hi"}).json()["id"]
            body = {"input_file_id": file_id, "endpoint": "/v1/jobs", "completion_window": "24h", "webhook_url": hook}

            def create() -> float:
                started = time.perf_counter()
                resp = a.post("/v1/batches", json=body)
                assert resp.status_code == 200, resp.text
                return time.perf_counter() - started

            single = [create() for _ in range(2)]
            reads: list[float] = []
            done = threading.Event()

            def read_loop() -> None:
                while not done.is_set():
                    started = time.perf_counter()
                    assert b.get(f"/v1/jobs/{job_id}").status_code == 200
                    reads.append(time.perf_counter() - started)
                    time.sleep(0.1)

            reader = threading.Thread(target=read_loop)
            reader.start()
            time.sleep(0.5)
            with ThreadPoolExecutor(concurrent) as pool:
                burst = list(pool.map(lambda _: create(), range(concurrent)))
            time.sleep(0.5)
            done.set()
            reader.join()
            accepted = receiver.accepted
        finally:
            proc.terminate()
            proc.wait(30)
            receiver.close()
    result = {
        "tree": str(tree),
        "single_create_s": single,
        "burst": concurrent,
        "burst_create_s": {"p50": percentile(burst, 0.5), "max": max(burst)},
        "other_tenant_read_s": {"n": len(reads), "p50": percentile(reads, 0.5), "max": max(reads)},
        "receiver_connections": accepted,
    }
    say(
        table(
            f"webhook receiver that never answers ({tree})",
            ["measure", "seconds"],
            [
                ["one POST /v1/batches", max(single)],
                [f"{concurrent} concurrent POST /v1/batches, p50", result["burst_create_s"]["p50"]],
                [f"{concurrent} concurrent POST /v1/batches, max", result["burst_create_s"]["max"]],
                ["other tenant's GET /v1/jobs/{id} meanwhile, p50", result["other_tenant_read_s"]["p50"]],
                ["other tenant's GET /v1/jobs/{id} meanwhile, max", result["other_tenant_read_s"]["max"]],
            ],
        )
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_stall")
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to measure")
    parser.add_argument("--redis-url", help="a Redis database to use (it is flushed); default: an embedded Valkey")
    parser.add_argument("--label", default="current", help="key of this run in the results file")
    args = parser.parse_args(argv)
    if args.redis_url:
        result = run(args.tree.resolve(), args.redis_url)
    else:
        from queueformer.server.embedded import EmbeddedRedis

        with tempfile.TemporaryDirectory() as tmp:
            server = EmbeddedRedis(Path(tmp), port=free_port())
            server.start()
            try:
                result = run(args.tree.resolve(), server.url)
            finally:
                server.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "webhook_stall.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved[args.label] = result
    path.write_text(json.dumps(saved, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
