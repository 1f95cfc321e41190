"""The supervisor of `queueformer up`: a crashed process is started again after a doubling backoff, and one
that keeps crashing stops the supervisor with a message naming it. Real child processes, no Redis."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from queueformer.contract.settings import load_settings
from queueformer.server.cluster import Child, Cluster
from queueformer.server.supervisor import CrashLoop, Supervisor


def crashing_cluster(tmp_path: Path) -> Cluster:
    cluster = Cluster(load_settings(data_dir=tmp_path / "data", redis_url="redis://127.0.0.1:1/0"))
    cluster.redis_url = "redis://127.0.0.1:1/0"  # nothing answers: no worker ever counts as ready
    cmd = [sys.executable, "-c", "print('loading the model...'); raise SystemExit(3)"]
    log = cluster.log_dir / "worker-0.log"
    cluster.children.append(Child("worker-0", Cluster._popen(cmd, {}, log), log, cmd, {}))
    return cluster


def exited(child: Child) -> None:
    child.proc.wait(30)


def test_a_crashed_worker_is_restarted_with_a_doubling_backoff(tmp_path: Path) -> None:
    cluster = crashing_cluster(tmp_path)
    said: list[str] = []
    sup = Supervisor(cluster, backoff_s=1, crash_loop_limit=10, say=said.append)
    child = cluster.children[0]
    first = child.proc
    exited(child)
    t = time.monotonic()
    sup.tick(t)  # crash 1: restart due in 1 s
    assert child.proc is first and said[-1] == "worker-0 exited with code 3; restarting it in 1s (crash 1 in a row)"
    sup.tick(t + 0.5)
    assert child.proc is first  # still backing off
    sup.tick(t + 1.0)
    assert child.proc is not first and sup.restarts == {"worker-0": 1}
    exited(child)
    sup.tick(t + 2)
    assert said[-1].endswith("restarting it in 2s (crash 2 in a row)")
    sup.tick(t + 4)
    exited(child)
    sup.tick(t + 5)
    assert said[-1].endswith("restarting it in 4s (crash 3 in a row)") and sup.restarts == {"worker-0": 2}


def sleeping_worker(cluster: Cluster) -> Child:
    """A worker process that runs until killed, added to ``cluster``."""
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    log = cluster.log_dir / "worker-0.log"
    child = Child("worker-0", Cluster._popen(cmd, {}, log), log, cmd, {})
    cluster.children.append(child)
    return child


def test_a_run_longer_than_healthy_after_ends_the_row_of_crashes(tmp_path: Path) -> None:
    cluster = Cluster(load_settings(data_dir=tmp_path / "data", redis_url="redis://127.0.0.1:1/0"))
    child = sleeping_worker(cluster)
    said: list[str] = []
    sup = Supervisor(cluster, backoff_s=1, healthy_after_s=10, say=said.append)
    try:
        t = time.monotonic()
        sup.tick(t)
        child.proc.kill()
        child.proc.wait()
        sup.tick(t + 1)
        assert said[-1].endswith("restarting it in 1s (crash 1 in a row)")
        sup.tick(t + 2)  # restarted: it sleeps
        sup.tick(t + 20)  # ran past healthy_after_s
        child.proc.kill()
        child.proc.wait()
        sup.tick(t + 21)
        assert said[-1].endswith("restarting it in 1s (crash 1 in a row)")
    finally:
        if child.proc.poll() is None:
            child.proc.kill()


def test_a_crash_loop_stops_with_a_message_naming_the_process_and_its_log(tmp_path: Path) -> None:
    cluster = crashing_cluster(tmp_path)
    sup = Supervisor(cluster, backoff_s=0, crash_loop_limit=3, say=lambda _m: None)
    with pytest.raises(CrashLoop) as caught:
        for _ in range(50):
            sup.tick()
            time.sleep(0.1)
    message = str(caught.value)
    assert message.startswith(
        "worker-0 exited 3 times in a row without becoming ready (last exit code 3); not restarting it again"
    )
    assert str(cluster.log_dir / "worker-0.log") in message and "loading the model..." in message
    assert isinstance(cluster.children[0].proc, subprocess.Popen)


class AnnouncedCluster(Cluster):
    """A cluster whose fleet record says ``announced`` pids became ready (the record Redis would hold)."""

    announced: set[int] = set()

    def ready_worker_pids(self) -> set[int]:
        return set(self.announced)


def test_a_worker_ready_and_killed_between_two_looks_ends_the_row_of_crashes(tmp_path: Path) -> None:
    cluster = AnnouncedCluster(load_settings(data_dir=tmp_path / "data", redis_url="redis://127.0.0.1:1/0"))
    child = sleeping_worker(cluster)
    said: list[str] = []
    sup = Supervisor(cluster, backoff_s=1, say=said.append)
    try:
        t = time.monotonic()
        for n in range(1, 4):  # killed before it ever announced itself: a row of crashes
            child.proc.kill()
            child.proc.wait()
            sup.tick(t)
            assert said[-1].endswith(f"(crash {n} in a row)")
            t += 10
            sup.tick(t)  # restarted
        cluster.announced = {child.proc.pid}  # it became ready, and is killed before the next look
        child.proc.kill()
        child.proc.wait()
        sup.tick(t + 1)
        assert said[-1].endswith("restarting it in 1s (crash 1 in a row)")
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
