"""Background upkeep of the API process: sweeps for dead workers (on a thread of their own), audits of open
work, the file-expiry sweep, webhook deliveries and the dashboard's samples.

Threads, not a Celery beat: the API is the one process that is always up and already publishes.
Every replica runs them; a Redis lock lets one audit at a time (see ``queueformer.server.reconcile``),
each webhook attempt is claimed by one replica (see ``queueformer.server.webhooks``) and one replica
samples per interval (see ``api.history``). None runs on a request's thread, so a slow receiver never
holds a request. The sweep deletes files past their expiry from storage and Redis, giving their bytes
back to their tenant's quota; replicas sweeping at once each drop a file at most once (``FileStore``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from api import metrics
from api.history import History
from api.services import Services
from queueformer.contract.units import JobsUnit, LinesUnit
from queueformer.server.broker import publish, restore_deliveries
from queueformer.server.liveness import Liveness, Sweep
from queueformer.server.reconcile import Audit, Reconciler

log = logging.getLogger(__name__)


class Upkeep:
    def __init__(self, services: Services) -> None:
        self.services = services
        settings = services.settings.api
        self.interval_s = settings.reconcile_interval_s
        self.reconciler = Reconciler(
            services.redis,
            services.jobs,
            services.batches,
            self._queue_for,
            self._send,
            after_s=settings.reconcile_after_s,
            confirm_s=self.interval_s,
        )
        self.liveness_interval_s = settings.liveness_interval_s
        self.liveness = Liveness(services.redis, lambda tags: restore_deliveries(services.celery, tags))
        self.history = History(services.redis, settings.history_interval_s)
        self.sweep_interval_s = settings.file_sweep_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="upkeep", daemon=True)
        # Sweeps for dead workers run on their own thread: an audit of a large batch or a file sweep can take
        # seconds, and recovery from a lost worker must not wait behind them.
        self._liveness = threading.Thread(target=self._liveness_loop, name="liveness", daemon=True)
        self.webhook_concurrency = settings.webhook_concurrency
        self._webhooks = threading.Thread(
            target=services.webhooks.serve, args=(self.webhook_concurrency,), name="webhooks", daemon=True
        )

    def start(self) -> None:
        if max(self.interval_s, self.sweep_interval_s, self.history.interval_s) > 0:
            self._thread.start()
        if self.liveness_interval_s > 0:
            self._liveness.start()
        if self.webhook_concurrency > 0:
            if self.services.webhooks.key is None:
                log.warning("QUEUEFORMER_API__WEBHOOK_SECRET is not set: batch webhooks are sent unsigned")
            self._webhooks.start()

    def stop(self) -> None:
        self._stop.set()
        self.services.webhooks.stop()
        for thread in (self._thread, self._liveness, self._webhooks):
            if thread.is_alive():
                # A webhook attempt in flight ends within webhook_timeout_s; one cut short is sent again later.
                thread.join(timeout=self.services.settings.api.webhook_timeout_s + 5)

    def sample(self) -> bool:
        return self.history.sample(sorted(self.services.registry().queues()))

    def audit(self) -> Audit:
        report = self.reconciler.audit()
        metrics.RESENT.labels("job").inc(len(report.resent_jobs))
        metrics.RESENT.labels("batch_chunk").inc(len(report.resent_units))
        return report

    def bury(self) -> Sweep:
        """Hand back the messages of workers whose heartbeat stopped."""
        return self.liveness.sweep()

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete every file whose expiry has passed (in rounds of 1,000); returns their ids."""
        swept: list[str] = []
        while batch := self.services.files.sweep_expired(now):
            swept += batch
            if len(batch) < 1000 or self._stop.is_set():
                break
        return swept

    def _loop(self) -> None:
        plan: list[tuple[float, str, Callable[[], object]]] = [
            (self.interval_s, "audit of open work", self.audit),
            (self.sweep_interval_s, "file sweep", self.sweep),
            (self.history.interval_s, "dashboard sample", self.sample),
        ]
        tasks = [t for t in plan if t[0] > 0]
        due = {name: time.monotonic() + every for every, name, _ in tasks}
        due["dashboard sample"] = time.monotonic()  # the plots have a point as soon as the API is up
        while not self._stop.wait(max(0.0, min(due.values()) - time.monotonic())):
            for every, name, run in tasks:
                if time.monotonic() < due[name]:
                    continue
                due[name] = time.monotonic() + every
                try:
                    run()
                except redis.RedisError as exc:
                    log.warning("%s skipped: Redis is away (%s)", name, exc)
                except Exception:  # a bug here must not stop the next round
                    log.exception("%s failed", name)

    def _liveness_loop(self) -> None:
        while not self._stop.wait(self.liveness_interval_s):
            try:
                self.bury()
            except redis.RedisError as exc:
                log.warning("sweep of dead workers skipped: Redis is away (%s)", exc)
            except Exception:  # a bug here must not stop the next sweep
                log.exception("sweep of dead workers failed")

    def _queue_for(self, model: str, tenant: str) -> str:
        registry = self.services.registry()
        entry = registry.get(model, tenant=tenant)
        return registry.queue_for(entry, entry.task)

    def _send(self, unit: JobsUnit | LinesUnit, queue: str) -> None:
        publish(self.services.celery, unit, queue)
