"""``queueformer worker``: load this worker's models, then consume their queues.

Models load in this process before the first message is taken, and nothing forks afterwards: the
Celery pool is threads, all feeding the one engine per model (the prefork + CUDA trap,
pytorch#40403 and celery#3402, cannot happen). Readiness is reported only once every model is
loaded and the consumer runs; a fatal engine error fails liveness.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import uuid
from typing import Any

import redis
from celery.signals import task_received, worker_ready, worker_shutting_down

from queueformer.contract import limits
from queueformer.contract.errors import WorkerFatal
from queueformer.contract.registry import ModelEntry, Registry
from queueformer.contract.settings import Settings, get_settings
from queueformer.server.batches import Batches
from queueformer.server.broker import make_celery, restore_deliveries
from queueformer.server.connection import connect
from queueformer.server.files import FileStore, TrainingData
from queueformer.server.fleet import HEARTBEAT_S, Fleet
from queueformer.server.jobs import JobStore
from queueformer.server.liveness import Custody
from queueformer.server.overlay import ModelOverlay
from queueformer.server.storage import Storage
from workers.custody import CustodyTracker
from workers.engine.lane import Lane
from workers.fine_tuned import FineTunedModels
from workers.handlers.fine_tune import FineTuneHandler
from workers.health import Health
from workers.holder import ModelHolder, serve
from workers.lease import LeaseKeeper
from workers.lines import LineRunner
from workers.memory import MemoryGuard
from workers.metrics import EngineView, MetricsPublisher
from workers.reconnect import reconnect_step
from workers.runner import Runner
from workers.tasks import register
from workers.training.runner import TrainingRunner
from workers.watch import CancelWatcher

log = logging.getLogger("queueformer.worker")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="queueformer worker", description=__doc__)
    p.add_argument("--queues", "-Q", nargs="+", help="queues to serve (default: settings.worker.queues)")
    p.add_argument("--concurrency", "-c", type=int, help="messages in flight at once")
    p.add_argument("--health-port", type=int, help="port for /healthz, /readyz, /metrics (0: none)")
    p.add_argument("--name", help="worker name (default: queues@host.pid)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = get_settings()
    queues = args.queues or settings.worker.queues
    if not queues:
        sys.stderr.write("no queues given: pass --queues or set QUEUEFORMER_WORKER__QUEUES\n")
        return 2
    return run_worker(settings, queues, concurrency=args.concurrency, health_port=args.health_port, name=args.name)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.logging.set_verbosity_warning()
    transformers.logging.disable_progress_bar()


def load_failure(settings: Settings, entry: ModelEntry, exc: WorkerFatal) -> str:
    """Which entry could not load, why, and what to do about it, in one line for the log and the fleet."""
    models_dir = settings.resolved_models_dir
    if "does not exist" in exc.message and entry.path is not None:
        todo = (
            f"build the tiny models with `queueformer models build-tiny {models_dir}` if it is one of them, or fix "
            f"the entry's path (relative paths start at models_dir, {models_dir})"
        )
    else:
        todo = f"fix or remove the entry in the registry ({settings.registry}), then restart the worker"
    return (
        f"model entry {entry.name!r} could not load: {exc.message}. To fix: {todo}. This worker serves its other "
        f"queues; jobs for {entry.name!r} wait on queue {entry.queue!r} until a worker loads it."
    )


def load_models(
    settings: Settings,
    registry: Registry,
    queues: list[str],
    storage: Storage,
    overlay: ModelOverlay,
    failed: dict[str, str] | None = None,
) -> ModelHolder:
    """Every pinned model of these queues, loaded now; fine-tuned ones later, on demand, when served here.

    With ``failed`` given, a model that cannot load is recorded there (name -> what went wrong and what
    to do) and the others still load; without it, the first failure is raised.
    """
    lane = Lane("worker")  # the process's one thread for model work, loading included
    on_demand = (
        FineTunedModels(
            overlay, registry, storage, settings.resolved_models_dir, settings.worker.cancel_poll_steps, lane=lane
        )
        if registry.fine_tune.serve_queue in queues
        else None
    )
    holder = ModelHolder(on_demand, capacity=settings.worker.finetuned_cache_size, lane=lane)
    for entry in registry:
        if entry.queue in queues:
            try:
                served = serve(
                    entry,
                    settings.resolved_models_dir,
                    settings.worker.offload_folder,
                    settings.worker.cancel_poll_steps,
                    lane=lane,
                )
            except WorkerFatal as exc:
                if failed is None:
                    raise
                failed[entry.name] = load_failure(settings, entry, exc)
                log.error("%s", failed[entry.name])
                continue
            holder.add(served)
    return holder


def training_runner(
    settings: Settings, registry: Registry, files: FileStore, jobs: JobStore, overlay: ModelOverlay
) -> TrainingRunner:
    models_dir = settings.resolved_models_dir
    storage = files.storage
    training = TrainingData(files, settings.training_data_uris, settings.storage_options)
    handler = FineTuneHandler(registry, models_dir, storage, jobs, overlay, settings.data_dir / "training", training)
    # A fine-tune runs alone on its worker, so every delivery it did not finish is a death while it ran
    # alone: it gets as many as a batch line gets before quarantine.
    attempts = settings.worker.isolate_after_strikes + 1
    # The lease is renewed every optimizer step; a killed run's lease lapses soon after its message is handed
    # back (seconds after its heartbeat stops), so the next delivery resumes it instead of stepping aside.
    return TrainingRunner(handler, jobs, storage, attempts, lease_s=30)


def build_runner(
    settings: Settings,
    registry: Registry,
    queues: list[str],
    client: redis.Redis,
    storage: Storage,
    jobs: JobStore,
    holder: ModelHolder,
    overlay: ModelOverlay,
    tracker: CustodyTracker | None = None,
) -> Runner:
    """The runner with everything it needs, wired at construction."""
    files = FileStore(client, storage)
    # A batch this worker ends queues its webhook in Redis; the API sends it, so no secret is needed here.
    batches = Batches(client, storage, files)

    def stop_flags(keys: list[str]) -> set[str]:
        job_ids = [k for k in keys if k.startswith("job-")]
        batch_ids = [k for k in keys if k.startswith("batch_")]
        return (jobs.cancel_requested(job_ids) if job_ids else set()) | (
            batches.stopped(batch_ids) if batch_ids else set()
        )

    watcher = CancelWatcher(stop_flags)
    training = training_runner(settings, registry, files, jobs, overlay) if registry.fine_tune.queue in queues else None
    return Runner(
        holder,
        jobs,
        storage,
        max_deliveries=settings.worker.max_deliveries,
        isolate_after_strikes=settings.worker.isolate_after_strikes,
        tracker=tracker,
        watcher=watcher,
        lines=LineRunner(
            batches,
            storage,
            watcher,
            settings.worker.max_deliveries,
            isolate_after_strikes=settings.worker.isolate_after_strikes,
            tracker=tracker,
        ),
        training=training,
    )


class Announcer:
    """Announces this worker to the fleet every ``HEARTBEAT_S``: its models, their measured rates, readiness.

    The announcement is the worker's heartbeat: when it lapses, the worker's messages are handed back.
    """

    def __init__(
        self,
        fleet: Fleet,
        worker_id: str,
        info: dict[str, Any],
        holder: ModelHolder,
        health: Health,
        lines: LineRunner | None,
    ) -> None:
        self.fleet, self.worker_id, self.info = fleet, worker_id, info
        self.holder, self.health, self.lines = holder, health, lines
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fleet", daemon=True)

    def start(self) -> None:
        # Announced before the first message is taken: records of a worker without a heartbeat are a dead one's.
        self._announce()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.fleet.leave(self.worker_id)

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._announce()

    def _announce(self) -> None:
        models = self.holder.describe()
        rates = self.lines.throughput.rates if self.lines is not None else {}
        for model, rate in rates.items():
            models[model]["lines_per_s"] = round(rate, 2)
        state = {"models": models, "ready": self.health.ready, "healthy": self.health.alive}
        try:
            self.fleet.announce(self.worker_id, {**self.info, **state})
        except redis.RedisError:
            log.warning("could not announce to the fleet; Redis is away", exc_info=True)


def default_concurrency(settings: Settings, registry: Registry, queues: list[str]) -> int:
    # A fine-tune holds the device for its whole run: a training-only worker takes one message at a time.
    return 1 if queues == [registry.fine_tune.queue] else settings.worker.concurrency


def run_worker(
    settings: Settings,
    queues: list[str],
    *,
    concurrency: int | None = None,
    health_port: int | None = None,
    name: str | None = None,
) -> int:
    configure_logging(settings.log_level)
    limits.install(settings.limits)
    registry = Registry.load(settings.registry)
    known = registry.queues()
    unknown = [q for q in queues if q not in known]
    if unknown:
        log.error("unknown queues %s; the registry has: %s", unknown, ", ".join(sorted(known)))
        return 2
    # One id per incarnation: a container restarted in place (same host name, pid 1) is a new worker, and
    # the dead one's messages must not pass for the new one's.
    worker_id = f"{name or '+'.join(queues) + '@' + socket.gethostname()}.{os.getpid()}-{uuid.uuid4().hex[:6]}"

    client = connect(settings.redis())
    storage = Storage(settings.resolved_storage_url, settings.storage_options)
    jobs = JobStore(client, settings.event_ttl_s)
    fleet = Fleet(client)

    overlay = ModelOverlay(client, storage, registry.fine_tune.serve_queue)
    failed: dict[str, str] = {}
    holder = load_models(settings, registry, queues, storage, overlay, failed)
    # A queue whose every model failed is left alone: its jobs wait for a worker that loads one, instead
    # of being taken here and failed. The rest are served.
    lost = {e.queue for e in registry if e.name in failed} - {e.queue for e in registry if e.name in holder}
    queues = [q for q in queues if q not in lost]
    if not queues:
        log.error("no model of this worker's queues could load; nothing to serve")
        return 3

    health = Health(alive=lambda: holder.healthy)
    port = health_port if health_port is not None else settings.worker.health_port
    if port:
        log.info("health and metrics on :%d", health.serve("0.0.0.0", port))

    guard = MemoryGuard(settings.worker.memory_limit_mb)
    lease = LeaseKeeper(client, settings.visibility_timeout_s, settings.worker.lease_renew_s)
    tracker = CustodyTracker(Custody(client, worker_id))
    runner = build_runner(settings, registry, queues, client, storage, jobs, holder, overlay, tracker)
    app = make_celery(settings, registry)
    # Messages Celery drops with a lost broker connection go back to their queues when it returns.
    app.steps["consumer"].add(reconnect_step(client, worker_id, lease.held, lambda tags: restore_deliveries(app, tags)))
    slots = concurrency or default_concurrency(settings, registry, queues)
    # One slot is kept from batch chunks, for jobs (see workers.tasks.register).
    line_slots = slots - 1 if slots > 1 else slots
    register(app, runner, lease, line_slots=line_slots if line_slots < slots else None)
    info = {"queues": queues, "pid": os.getpid(), "host": socket.gethostname(), "slots": slots, "failed": failed}
    info["line_slots"] = line_slots
    announcer = Announcer(fleet, worker_id, info, holder, health, runner.lines)

    @task_received.connect(weak=False)
    def _received(request: Any, **_: Any) -> None:
        # Before the task runs, prefetched or not: a SIGKILL from here on hands the message back in seconds.
        tracker.took(getattr(request.message, "delivery_tag", None))

    @worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        health.ready = True
        log.info("worker %s ready: %s", worker_id, ", ".join(holder.names()) or "(no models)")

    @worker_shutting_down.connect(weak=False)
    def _draining(**_: Any) -> None:
        health.ready = False
        if runner.training is not None:
            runner.training.draining.set()  # a running fine-tune checkpoints and re-queues itself

    announcer.start()
    publisher = MetricsPublisher(
        client,
        worker_id,
        lambda: [
            EngineView(s.entry.name, s.engine, s.entry.max_batch_size, s.entry.kv_cache_tokens) for s in holder.all()
        ],
        settings.worker.metrics_interval_s,
    )
    publisher.start()
    worker = app.Worker(
        hostname=worker_id,
        queues=queues,
        pool="threads",
        concurrency=slots,
        loglevel=settings.log_level,
        without_mingle=True,
        without_gossip=True,
        optimization="fair",
    )
    try:
        worker.start()
    finally:
        publisher.stop()
        runner.stop()
        lease.stop()
        holder.stop()
        tracker.stop()  # nothing runs any more: a clean exit leaves no executing record to strike
        announcer.stop()
        guard.stop()
        health.stop()
    return int(worker.exitcode or 0)


if __name__ == "__main__":
    sys.exit(main())
