"""``queueformer up`` as a supervisor: what dies is started again, as Kubernetes restarts a crashed
container.

A worker, the API or Flower that exits is started again after a backoff that doubles with every crash in
a row (1 s, 2 s, 4 s ... up to ``max_backoff_s``). The row ends once the process is healthy again: a
worker once it announces itself ready, any other process once it has run for ``healthy_after_s``. A
process that exits ``crash_loop_limit`` times in a row without becoming healthy (a model that cannot
load, a bad setting) is in a crash loop: the supervisor stops and says which process, how it exited and
where its log is, instead of restarting it forever. A worker killed after it became ready (preemption,
the host's OOM killer, a poison input) is restarted as often as it dies. The embedded Valkey is
restarted at once on the same port and data dir (its AOF holds every accepted job), so every other
process keeps its URL and reconnects. Nothing else is stopped meanwhile: the API stays up while a worker
restarts, and a dead worker's messages go back to their queue on heartbeat loss
(``queueformer.server.liveness``), not when it comes back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from queueformer.server.cluster import Child, Cluster

log = logging.getLogger(__name__)


class CrashLoop(RuntimeError):
    """A process kept crashing; restarting it again would only hide why."""


@dataclass
class _Restarts:
    due: float | None = None  # when the pending restart happens
    started: float = field(default_factory=time.monotonic)
    streak: int = 0  # exits in a row without a healthy run between them


@dataclass
class Supervisor:
    """Watches a started :class:`Cluster` and restarts what exits."""

    cluster: Cluster
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    healthy_after_s: float = 60.0
    crash_loop_limit: int = 5
    say: Callable[[str], None] = log.warning
    restarts: dict[str, int] = field(default_factory=dict)  # name -> restarts so far (for the curious and tests)
    _state: dict[str, _Restarts] = field(default_factory=dict)

    def tick(self, now: float | None = None) -> None:
        """One look at every process; raises :class:`CrashLoop` for one that keeps crashing."""
        now = time.monotonic() if now is None else now
        self._tend_redis()
        ready: set[int] | None = None

        def announced(child: Child) -> bool:
            nonlocal ready
            if not child.name.startswith("worker"):
                return False
            ready = self.cluster.ready_worker_pids() if ready is None else ready
            return child.proc.pid in ready

        for child in self.cluster.children:
            state = self._state.setdefault(child.name, _Restarts(started=now))
            alive = child.proc.poll() is None
            # A worker that announced itself ready ends the row, alive or just dead: killed between two looks
            # (a preemption right after it took work), its announcement outlives it until its heartbeat lapses.
            if state.streak and (
                (alive and now - state.started >= self.healthy_after_s) or (state.due is None and announced(child))
            ):
                state.streak = 0
            if alive:
                continue
            if state.due is None:
                self._crashed(child, state, now)
            if state.due is not None and now >= state.due:
                self.cluster.respawn(child)
                state.due, state.started = None, now
                self.restarts[child.name] = self.restarts.get(child.name, 0) + 1

    def run(self, stopping: Callable[[], bool], on_ready: Callable[[], None], interval_s: float = 0.5) -> None:
        """Supervise until ``stopping()``; ``on_ready`` is called once, when the cluster is first ready."""
        announced = False
        while not stopping():
            self.tick()
            if not announced and self.cluster.ready():
                on_ready()
                announced = True
            time.sleep(interval_s)

    def _crashed(self, child: Child, state: _Restarts, now: float) -> None:
        code = child.proc.returncode
        state.streak += 1
        if state.streak >= self.crash_loop_limit:
            tail = child.log_path.read_text(errors="replace")[-2000:]
            raise CrashLoop(
                f"{child.name} exited {state.streak} times in a row without becoming ready (last exit code "
                f"{code}); not restarting it again. Its log is {child.log_path}; last lines:\n{tail}"
            )
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (state.streak - 1))
        state.due = now + delay
        self.say(f"{child.name} exited with code {code}; restarting it in {delay:.0f}s (crash {state.streak} in a row)")

    def _tend_redis(self) -> None:
        server = self.cluster.redis
        if server is None or server.alive():
            return
        self.say(f"the embedded Valkey stopped; restarting it on the same data dir ({server.data_dir})")
        server.start()
        self.restarts["valkey"] = self.restarts.get("valkey", 0) + 1
