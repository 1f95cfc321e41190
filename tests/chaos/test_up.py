"""`queueformer up` supervises: worker SIGKILLs and a Valkey SIGKILL mid-batch, nobody restarts anything by
hand, and the batch completes with every line once. Default settings throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from queueformer.client import Client
from queueformer.server.fleet import Fleet
from tests.chaos.test_worker_kills import batch_lines, fleet_id, kill_and_time_recovery
from tests.conftest import free_port
from tests.helpers import eventually, jsonl

RUN_CLI = "import sys; from queueformer.cli import main; sys.exit(main())"  # what the `queueformer` script runs


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    api_url: str
    log: Path
    data_dir: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self, marker: str) -> list[int]:
        """Pids of `up`'s child processes whose command line contains ``marker``."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid and marker in cmdline:
                pids.append(int(entry.name))
        return pids

    def redis(self) -> redis.Redis:
        password = (self.data_dir / "valkey" / "requirepass").read_text().strip()
        port = int(
            next(
                line.split()[1]
                for line in (self.data_dir / "valkey" / "valkey.conf").read_text().splitlines()
                if line.startswith("port ")
            )
        )
        # The test reads Redis across the Valkey restart `up` performs: a dropped connection is retried
        # (for up to about a minute) rather than failing the test for a restart it asked for.
        retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), 40)
        return redis.Redis(host="127.0.0.1", port=port, password=password, decode_responses=True, retry=retry)


@dataclass
class Pid:
    """A process of `up` seen as a worker the chaos helpers can kill."""

    pid: int

    @property
    def proc(self) -> Pid:
        return self

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


@pytest.fixture
def up(tmp_path: Path, tiny_models: Path) -> Iterator[Up]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUEFORMER_") or k == "QUEUEFORMER_TEST_EMBEDDED"}
    env.update(
        {
            "QUEUEFORMER_DATA_DIR": str(tmp_path / "data"),
            "QUEUEFORMER_MODELS_DIR": str(tiny_models),
            "QUEUEFORMER_STORAGE_URL": f"file://{tmp_path / 'storage'}",
            "QUEUEFORMER_QUOTA__MAX_ENQUEUED_TOKENS": str(10**9),
            "PYTHONUNBUFFERED": "1",
        }
    )
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", RUN_CLI, "up", "--port", str(port), "--flower-port", "0"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Up(proc, f"http://127.0.0.1:{port}", log, tmp_path / "data")
    try:
        eventually(lambda: "queueformer is up" in running.output() or proc.poll() is not None, timeout=300)
        assert proc.poll() is None, running.output()
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def next_worker(up: Up, r: redis.Redis, killed: set[int]) -> int:
    """A live worker of `up` that has announced itself ready and was not killed yet (0 while there is none)."""
    ready = {m.get("pid") for m in Fleet(r).members() if m.get("ready")}
    return next((p for p in up.children("workers.main") if p not in killed and p in ready), 0)


@pytest.mark.timeout(1800)
def test_up_restarts_killed_workers_and_valkey_and_the_batch_completes(up: Up) -> None:
    # "up" only said so once its worker was ready: the worker announced itself, from a live process.
    r = up.redis()
    (worker,) = up.children("workers.main")
    assert fleet_id(r, worker) is not None
    with Client(up.api_url) as qf:
        total = 3000
        batch = qf.create_batch(qf.upload(jsonl(batch_lines(total, 192)))["id"], "/v1/jobs")

        def completed() -> int:
            return int(qf.batch(batch["id"])["request_counts"]["completed"])

        # Each worker is killed as soon as it has committed work: waiting for a dead worker's messages to come
        # back (seconds) happens beside the loop, so a fast machine is still mid-batch after the fifth kill.
        handbacks: list[Future[tuple[float, int]]] = []
        stalls: list[float] = []
        killed_pids: set[int] = set()
        floor, killed = 50, 0.0
        started = time.monotonic()
        with ThreadPoolExecutor(5) as pool:
            while len(handbacks) < 5:
                pid = eventually(lambda: next_worker(up, r, killed_pids), timeout=300, interval=0.2)
                eventually(lambda f=floor: completed() >= f, timeout=300, interval=0.2)
                if handbacks:
                    stalls.append(time.monotonic() - killed)
                killed_pids.add(pid)
                killed = time.monotonic()
                handbacks.append(pool.submit(kill_and_time_recovery, r, Pid(pid)))
                eventually(lambda p=pid: p not in up.children("workers.main"), timeout=30, interval=0.05)
                # Counted once the worker is gone, so that only the restarted worker's commits raise it: a
                # worker killed before it was ever ready would be a crash loop to `up`, not a preemption.
                at_kill = completed()
                assert at_kill < total, f"the batch finished before kill {len(handbacks)}: make it longer"
                floor = at_kill + 1
            eventually(lambda f=floor: completed() >= f, timeout=300, interval=0.2)
            stalls.append(time.monotonic() - killed)

            handed_back = [f.result()[0] for f in handbacks]

            # The broker next, while the restarted worker is busy with the batch.
            (valkey,) = up.children("valkey-server")
            at_valkey_kill = completed()
            os.kill(valkey, signal.SIGKILL)
            killed = time.monotonic()
            eventually(lambda: up.children("valkey-server"), timeout=60)
            eventually(lambda: httpx.get(f"{up.api_url}/readyz", timeout=2).status_code == 200, timeout=120)
            valkey_back = time.monotonic() - killed
            assert at_valkey_kill < total, "the batch finished before the Valkey kill: make it longer"

        done = qf.wait_batch(batch["id"], timeout=900, poll_s=1)
        elapsed = time.monotonic() - started
        assert done["request_counts"] == {"total": total, "completed": total, "failed": 0}, done
        out, err = qf.batch_results(done)
        ids = [o["custom_id"] for o in out]
        assert err == [] and len(ids) == total and set(ids) == {f"line-{i}" for i in range(total)}
    assert up.proc.poll() is None, up.output()  # `up` itself never went down
    text = up.output()
    assert text.count("worker-0 exited with code -9") == 5, text[-3000:]
    valkey_restarts = text.count("the embedded Valkey stopped")
    assert valkey_restarts >= 1, text[-3000:]
    print(
        f"queueformer up: 5 worker SIGKILLs and 1 Valkey SIGKILL, no manual restart; {total}/{total} lines in "
        f"{elapsed:.0f}s; messages back on the queue after "
        + ", ".join(f"{h:.1f}s" for h in handed_back)
        + "; batch progressing again after "
        + ", ".join(f"{s:.1f}s" for s in stalls)
        + f"; Valkey SIGKILLed at {at_valkey_kill}/{total} lines, back and the API ready {valkey_back:.1f}s later"
        + f" (Valkey restarts seen by `up`: {valkey_restarts})"
    )
    assert all(h <= 15 for h in handed_back), handed_back
