"""Server-side stores: what the API and the workers keep in Redis and in storage.

Job records and events, the batch ledger and lifecycle, files, tenants and API keys, the live fleet,
run-time model entries, checkpoints, storage, the broker's Celery app, the reconciler, webhook
delivery, and the single-machine cluster supervisor. Every Redis key is named in :mod:`keys`.
Needs the ``api`` or ``worker`` extra (redis, celery, fsspec); never imports torch.
"""
