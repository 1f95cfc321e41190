"""Every Redis key queueformer uses, named in one place.

Stores and Lua scripts take their key names from here (scripts through ``KEYS`` or, for keys derived
from a record's own fields, a template passed as an argument), so no other module spells ``qf:``.
Per-tenant indexes live under ``qf:{kind}:{tenant}``; cluster-wide sets are named so that no tenant
name (``[a-z0-9][a-z0-9_-]*``) can collide with them. Keys owned by kombu (Celery's Redis transport)
are listed at the end: queueformer reads them but never writes their layout.
"""

from __future__ import annotations

PREFIX = "qf"

# --- jobs -----------------------------------------------------------------------------------------


def job(job_id: str) -> str:
    """Hash: a job's record (state, spec, tenant, timestamps, result URI, error)."""
    return f"{PREFIX}:job:{job_id}"


def events(object_id: str) -> str:
    """Stream: a job's or batch's events (states, progress, tokens)."""
    return f"{PREFIX}:events:{object_id}"


def tenant_jobs(tenant: str) -> str:
    """Sorted set: a tenant's jobs by creation time."""
    return f"{PREFIX}:jobs:{tenant}"


def tenant_fine_tunes(tenant: str) -> str:
    """Sorted set: a tenant's fine-tune jobs by creation time."""
    return f"{PREFIX}:fine-tunes:{tenant}"


def tenant_index(index: str, tenant: str) -> str:
    """A tenant's job index by name: ``jobs`` or ``fine-tunes``."""
    return {"jobs": tenant_jobs, "fine-tunes": tenant_fine_tunes}[index](tenant)


# Every job not yet in a terminal state, by creation time: what the reconciler checks against the broker.
OPEN_JOBS = f"{PREFIX}:open-jobs"


def idempotency(tenant: str, key_digest: str) -> str:
    """String: the job ids created for an ``Idempotency-Key`` (hashed) and the body's digest."""
    return f"{PREFIX}:idem:{tenant}:{key_digest}"


def fine_tune_lease(job_id: str) -> str:
    """Lock: held by the worker training a fine-tune, so a second delivery steps aside."""
    return f"{PREFIX}:fine-tune-lease:{job_id}"


# --- tenants --------------------------------------------------------------------------------------


def tenant_tokens(tenant: str) -> str:
    """Integer: a tenant's estimated enqueued tokens (quota)."""
    return f"{PREFIX}:tenant:{tenant}:tokens"


# The same key with a Lua ``string.format`` hole for the tenant: scripts read the tenant from a record.
TENANT_TOKENS_TEMPLATE = tenant_tokens("%s")


def tenant_open_batches(tenant: str) -> str:
    """Set: a tenant's batches that have not ended."""
    return f"{PREFIX}:tenant:{tenant}:open_batches"


def tenant_keys(tenant: str) -> str:
    """Set: hashes of a tenant's API keys."""
    return f"{PREFIX}:tenant:{tenant}:keys"


def api_key(key_hash: str) -> str:
    """String: the tenant an API key (by SHA-256) belongs to."""
    return f"{PREFIX}:apikey:{key_hash}"


API_KEYS_PATTERN = api_key("*")

# Hash: key id (derived from the key's hash) -> JSON {tenant, created_at, prefix}; never the key itself.
API_KEY_INFO = f"{PREFIX}:apikey-info"


def tenant_stored_bytes(tenant: str) -> str:
    """Integer: bytes of a tenant's files in storage (uploads and produced files), against its storage quota."""
    return f"{PREFIX}:tenant:{tenant}:stored_bytes"


# --- batches --------------------------------------------------------------------------------------


def batch(batch_id: str) -> str:
    """Hash: a batch's record and counters."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_part(batch_id: str, part: str) -> str:
    """A batch's ledger parts: ``out``/``err`` (hashes of lines), ``done`` (bitmap), ``tries``, ``chunks``."""
    return f"{PREFIX}:batch:{batch_id}:{part}"


BATCH_PARTS = ("out", "err", "done", "tries", "chunks")


def tenant_batches(tenant: str) -> str:
    """Sorted set: a tenant's batches by creation time (microseconds, strictly increasing)."""
    return f"{PREFIX}:batches:{tenant}"


# Every tenant's open batches, for the reconciler's audits.
OPEN_BATCHES = f"{PREFIX}:open-batches"

# --- webhooks -------------------------------------------------------------------------------------


def webhook(event_id: str) -> str:
    """Hash: a batch-end webhook event (receiver URL, body, attempts, outcome) until it is delivered or dropped."""
    return f"{PREFIX}:webhook:{event_id}"


# The same key with a Lua ``string.format`` hole for the event id: scripts that claim events by id.
WEBHOOK_TEMPLATE = webhook("%s")
# Sorted set: webhook events waiting for an attempt, by when the attempt is due (Redis time, seconds).
WEBHOOKS_DUE = f"{PREFIX}:webhooks:due"
# Sorted set: webhook events an API process is sending, by when its claim lapses and another may send it.
WEBHOOKS_CLAIMED = f"{PREFIX}:webhooks:claimed"

# --- files, models, fleet -------------------------------------------------------------------------


def file(file_id: str) -> str:
    """Hash: a file's tenant and File object."""
    return f"{PREFIX}:file:{file_id}"


def tenant_files(tenant: str) -> str:
    """Sorted set: a tenant's files by creation time."""
    return f"{PREFIX}:files:{tenant}"


# Sorted set: every file that expires, by its expiry time (what the API's upkeep sweeps).
FILE_EXPIRY = f"{PREFIX}:file-expiry"


# Hash: run-time registry entries (fine-tuned models) by served name.
MODELS = f"{PREFIX}:models"


def worker(worker_id: str) -> str:
    """String with a short TTL: a live worker's announcement."""
    return f"{PREFIX}:worker:{worker_id}"


WORKERS_PATTERN = worker("*")

# --- the dashboard's series ----------------------------------------------------------------------

# Hash: model -> tokens generated for it so far (workers add at commit; the dashboard's tokens/s).
GENERATED_TOKENS = f"{PREFIX}:generated-tokens"


def queue_depth_series(queue: str) -> str:
    """Sorted set of ``"<ms>:<depth>"`` samples of one queue's length, scored by sample time (one hour kept)."""
    return f"{PREFIX}:series:queue-depth:{queue}"


def tokens_series(model: str) -> str:
    """Sorted set of ``"<ms>:<count>"`` samples of a model's ``GENERATED_TOKENS`` count, scored by time."""
    return f"{PREFIX}:series:tokens:{model}"


# Lock held for one sampling interval by the API replica that samples, so replicas do not double up.
SERIES_SAMPLER = f"{PREFIX}:series:sampler"

# --- reconciler -----------------------------------------------------------------------------------

RECONCILE_SUSPECTS = f"{PREFIX}:reconcile:suspects"
RECONCILE_LOCK = f"{PREFIX}:reconcile:lock"
RECONCILE_RESENT = f"{PREFIX}:reconcile:resent"

# --- kombu's own keys (Celery's Redis transport) ---------------------------------------------------

UNACKED = "unacked"  # hash: delivery tag -> [payload, exchange, routing key]
UNACKED_INDEX = "unacked_index"  # sorted set: delivery tag -> delivery time
PRIORITY_SEP = "\x06\x16"  # a queue's priority lists are "<queue><sep><priority>"
PRIORITY_STEPS = (0, 3, 6, 9)


def queue_lists(queue: str) -> list[str]:
    """The Redis lists kombu keeps for one queue, one per priority step."""
    return [queue if pri == 0 else f"{queue}{PRIORITY_SEP}{pri}" for pri in PRIORITY_STEPS]
