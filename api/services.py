"""What the API process holds for its lifetime: settings, Redis, storage, the registry and a publisher.

Built once in the app's lifespan (settings read at startup) and reached by routes through ``deps``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis
from celery import Celery

from queueformer import limits
from queueformer.batches import BatchStore
from queueformer.broker import make_celery
from queueformer.files import FileStore
from queueformer.fleet import Fleet
from queueformer.overlay import ModelOverlay
from queueformer.registry import Registry
from queueformer.settings import Settings
from queueformer.state import JobStore, connect
from queueformer.storage import Storage
from queueformer.tenants import ApiKeys


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
    batches: BatchStore
    overlay: ModelOverlay
    extras: dict[str, object] = field(default_factory=dict)

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
            batches=BatchStore(client, storage, files, webhook_secret=secret),
            overlay=ModelOverlay(client),
        )

    def registry(self) -> Registry:
        """The static registry plus the fine-tuned models registered at run time (one Redis read)."""
        return self.static_registry.with_entries(self.overlay.entries())

    def close(self) -> None:
        self.redis.close()
