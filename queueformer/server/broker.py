"""The Celery app both sides share: JSON-only messages, late acks, one queue per registered model.

The API only publishes (``send_task`` by name); workers register the task on the same configuration.
A message is a small versioned envelope (:class:`WorkUnit`) that names jobs or a range of batch lines:
inputs live in job records and uploaded files, results go to storage, so messages stay small.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from queueformer.contract.priority import MAX_PRIORITY
from queueformer.contract.registry import Registry
from queueformer.contract.settings import Settings
from queueformer.contract.units import RUN_TASK, JobsUnit, LinesUnit
from queueformer.server import keys
from queueformer.server.transport import TRANSPORT


def celery_config(settings: Settings) -> dict[str, Any]:
    vt = settings.visibility_timeout_s
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        # Redelivery, not loss: a message is acknowledged only after its work is committed, and a worker
        # that dies mid-task hands its messages back: seconds after its heartbeat stops
        # (queueformer.server.liveness), else after the visibility timeout, which in-flight work keeps
        # renewing (workers.lease).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_retry_on_startup": True,
        # kombu's Redis transport, except that a channel closing after its transport (a lost Redis)
        # fails with a connection error instead of killing the worker (queueformer.server.transport).
        "broker_transport": TRANSPORT,
        "broker_transport_options": {
            "visibility_timeout": vt,
            "unacked_restore_interval": max(1, min(10, vt // 4)),
            "unacked_restore_throttle": 1,
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
            "health_check_interval": 10,
            # One Redis list per priority step; a consumer's BRPOP names them in step order, so a queued
            # message of a higher step is taken before any of a lower one (queues rotate within a step,
            # kombu's default round_robin, so one busy model never starves another's queue).
            "priority_steps": list(keys.PRIORITY_STEPS),
            "sep": keys.PRIORITY_SEP,
        },
        "task_create_missing_queues": True,
        "task_default_queue": "queueformer-default",
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "broker_pool_limit": 16,
    }


def make_celery(settings: Settings, registry: Registry, name: str = "queueformer") -> Celery:
    """A Celery app on ``settings``' Redis whose routes come from the registry."""
    url = settings.redis()
    app = Celery(name, broker=url, set_as_current=False)
    app.conf.update(celery_config(settings))

    def route(task_name: str, _args: Any, kwargs: dict[str, Any], _options: Any, _task: Any = None, **_kw: Any) -> Any:
        unit = (kwargs or {}).get("unit") or {}
        model = unit.get("model")
        if task_name == RUN_TASK and isinstance(model, str) and model in registry:
            return {"queue": registry.get(model).queue}
        return None

    app.conf.task_routes = (route,)
    return app


def broker_priority(priority: int) -> int:
    """The message priority for a job priority: kombu's Redis transport takes its lowest step first."""
    return MAX_PRIORITY - priority


def publish(app: Celery, unit: JobsUnit | LinesUnit, queue: str, producer: Any = None) -> None:
    """Send one work unit to ``queue`` (explicit, so run-time fine-tuned models route too), at its priority."""
    app.send_task(
        RUN_TASK,
        kwargs={"unit": unit.model_dump()},
        queue=queue,
        producer=producer,
        priority=broker_priority(unit.priority),
    )


def restore_deliveries(app: Celery, tags: list[str]) -> None:
    """Put delivered, unacknowledged messages back on their queues now, through kombu's own restore.

    ``QoS.restore_by_tag`` takes the message out of ``unacked`` and pushes it (marked redelivered) to
    the queue and priority it came from, in one transaction; a tag acknowledged meanwhile is a no-op.
    """
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for tag in tags:
            channel.qos.restore_by_tag(tag, client=channel.client)
