"""Priorities: 0 to 9, higher first, on jobs and batches (whose lines inherit it).

AMQP's and Celery's direction (9 is the most urgent), not the Redis transport's list order, which the
broker maps at publish time. Defaults follow OpenAI's split: a batch is background work that may take
its completion window, so a batch without a ``priority`` runs below an interactive job without one. A
tenant's record can set its own defaults for both (``queueformer.server.tenants.TenantDefaults``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

MIN_PRIORITY = 0
MAX_PRIORITY = 9
DEFAULT_JOB_PRIORITY = 5
DEFAULT_BATCH_PRIORITY = 2

Priority = Annotated[
    int,
    Field(
        ge=MIN_PRIORITY,
        le=MAX_PRIORITY,
        description="0 to 9, higher first: queued messages and the engine's waiting rows are taken in this "
        "order, then by arrival. Default: the tenant's default, else 5 for jobs and 2 for batches.",
    ),
]
