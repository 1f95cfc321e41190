"""`queueformer up` supervises: worker SIGKILLs and a Valkey SIGKILL mid-batch, nobody restarts anything by
hand, and the batch completes with every line once. Default settings throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from queueformer.client import Client
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
        return redis.Redis(port=port, password=password, decode_responses=True)


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


@pytest.mark.timeout(1800)
def test_up_restarts_killed_workers_and_valkey_and_the_batch_completes(up: Up) -> None:
    # "up" only said so once its worker was ready: the worker announced itself, from a live process.
    r = up.redis()
    (worker,) = up.children("workers.main")
    assert fleet_id(r, worker) is not None
    with Client(up.api_url) as qf:
        batch = qf.create_batch(qf.upload(jsonl(batch_lines(1000, 8)))["id"], "/v1/jobs")
        stalls: list[tuple[float, float]] = []
        last = 0
        started = time.monotonic()
        while len(stalls) < 5:
            counts = eventually(
                lambda last=last: (c := qf.batch(batch["id"])["request_counts"])["completed"] >= last + 50 and c,
                timeout=300,
                interval=0.2,
            )
            pid = eventually(lambda: (p := up.children("workers.main")) and fleet_id(r, p[0]) and p[0], timeout=300)
            killed = time.monotonic()
            handed_back, _ = kill_and_time_recovery(r, Pid(pid))
            before = qf.batch(batch["id"])["request_counts"]["completed"]
            eventually(lambda b=before: qf.batch(batch["id"])["request_counts"]["completed"] > b, timeout=300)
            stalls.append((handed_back, time.monotonic() - killed))
            print(
                f"up, kill {len(stalls)}: messages back on the queue after {handed_back:.1f}s; "
                f"the restarted worker committed again {stalls[-1][1]:.1f}s after the kill"
            )
            last = counts["completed"]

        (valkey,) = up.children("valkey-server")
        os.kill(valkey, signal.SIGKILL)
        killed = time.monotonic()
        eventually(lambda: up.children("valkey-server"), timeout=60)
        eventually(lambda: httpx.get(f"{up.api_url}/readyz", timeout=2).status_code == 200, timeout=120)
        valkey_back = time.monotonic() - killed

        done = qf.wait_batch(batch["id"], timeout=900, poll_s=1)
        elapsed = time.monotonic() - started
        assert done["request_counts"] == {"total": 1000, "completed": 1000, "failed": 0}, done
        out, err = qf.batch_results(done)
        ids = [o["custom_id"] for o in out]
        assert err == [] and len(ids) == 1000 and set(ids) == {f"line-{i}" for i in range(1000)}
    assert up.proc.poll() is None, up.output()  # `up` itself never went down
    text = up.output()
    assert text.count("worker-0 exited with code -9") == 5 and "the embedded Valkey stopped" in text
    print(
        f"queueformer up: 5 worker SIGKILLs and 1 Valkey SIGKILL, no manual restart; 1000/1000 lines in "
        f"{elapsed:.0f}s; messages back on the queue after "
        + ", ".join(f"{h:.1f}s" for h, _ in stalls)
        + "; batch progressing again after "
        + ", ".join(f"{s:.1f}s" for _, s in stalls)
        + f"; Valkey back and the API ready {valkey_back:.1f}s after its SIGKILL"
    )
    assert all(h <= 15 for h, _ in stalls), stalls
