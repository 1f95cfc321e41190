"""What the API process holds for its lifetime: settings, Redis, storage, the registry and a publisher.

Built once in the app's lifespan (settings read at startup) and reached by routes through ``deps``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis
from celery import Celery

from api import metrics
from queueformer.contract import limits
from queueformer.contract.registry import Registry
from queueformer.contract.settings import Settings
from queueformer.server.batches import Batches
from queueformer.server.broker import make_celery
from queueformer.server.connection import connect
from queueformer.server.egress import EgressPolicy
from queueformer.server.files import FileStore, TrainingData
from queueformer.server.fleet import Fleet
from queueformer.server.jobs import JobStore
from queueformer.server.overlay import ModelOverlay
from queueformer.server.storage import Storage
from queueformer.server.tenants import ApiKeys
from queueformer.server.webhooks import Deliverer, DeliveryConfig


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    jobs: JobStore
    storage: Storage
    static_registry: Registry
    celery: Celery
    keys: ApiKeys
    fleet: Fleet
    files: FileStore
    batches: Batches
    overlay: ModelOverlay
    webhooks: Deliverer
    training: TrainingData
    extras: dict[str, object] = field(default_factory=dict)
    # /v1/models' `created` for registry entries without one: when this API loaded the registry.
    registry_loaded_at: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def build(cls, settings: Settings) -> Services:
        limits.install(settings.limits)
        client = connect(settings.redis())
        registry = Registry.load(settings.registry)
        keys = ApiKeys(client)
        keys.add_static([k.get_secret_value() for k in settings.api.bootstrap_keys])
        storage = Storage(settings.resolved_storage_url, settings.storage_options)
        files = FileStore(client, storage)
        secret = settings.api.webhook_secret.get_secret_value() if settings.api.webhook_secret else None
        webhooks = Deliverer(
            client,
            secret,
            EgressPolicy.from_allowlist(settings.api.webhook_allow),
            DeliveryConfig.from_settings(settings.api, settings.event_ttl_s),
            on_outcome=lambda done: metrics.WEBHOOK_DELIVERIES.labels(done.outcome).inc(),
        )
        return cls(
            settings=settings,
            redis=client,
            jobs=JobStore(client, settings.event_ttl_s),
            storage=storage,
            static_registry=registry,
            celery=make_celery(settings, registry),
            keys=keys,
            fleet=Fleet(client),
            files=files,
            batches=Batches(client, storage, files),
            overlay=ModelOverlay(client, storage, registry.fine_tune.serve_queue),
            webhooks=webhooks,
            training=TrainingData(files, settings.training_data_uris, settings.storage_options),
        )

    def registry(self) -> Registry:
        """The static registry plus the fine-tuned models registered at run time (one Redis read)."""
        return self.static_registry.with_entries(self.overlay.entries())

    def close(self) -> None:
        self.redis.close()
