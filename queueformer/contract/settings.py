"""Process settings, read once at startup from the environment, a .env file and a secrets dir.

``QUEUEFORMER_`` is the prefix and ``__`` nests: ``QUEUEFORMER_API__PORT=9000``,
``QUEUEFORMER_LIMITS__MAX_NEW_TOKENS=512``. Secrets (the Redis URL with its password, S3 keys, API
keys) may instead be files named like the variable in ``QUEUEFORMER_SECRETS_DIR`` (default
``/run/secrets`` when it exists), which is how Kubernetes and compose mount them.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NestedSecretsSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from queueformer.contract.limits import Limits


class ApiSettings(BaseModel):
    """The HTTP API process."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest JSON request body; larger gets 413.")
    auth_required: bool = Field(
        False, description="Reject requests without a valid Bearer API key. Off only for a single-user local cluster."
    )
    bootstrap_keys: list[SecretStr] = Field(
        default_factory=list,
        description="'tenant:key' pairs accepted at startup (hashed in memory). Prefer `queueformer keys create`.",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="Signs batch webhooks (Standard Webhooks, HMAC-SHA256): 'whsec_<base64>', whose decoded bytes are "
        "the key, or any other string, whose UTF-8 bytes are. Unset: webhooks go unsigned.",
    )
    webhook_allow: list[str] = Field(
        default_factory=list,
        description="Webhook receivers allowed although not public: CIDRs or addresses (10.0.0.0/8, fd00::/8) and "
        "host names (hooks.internal, or *.internal for any name under it). Default: public addresses only.",
    )
    webhook_concurrency: int = Field(
        4, ge=0, le=256, description="Webhook deliveries in flight at once in one API process; 0: this one sends none."
    )
    webhook_connect_timeout_s: float = Field(3.0, gt=0, le=60, description="Seconds to connect to a webhook receiver.")
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Seconds one webhook attempt may take in all (connect, send, response headers)."
    )
    webhook_max_attempts: int = Field(100, ge=1, le=1000, description="Attempts per webhook before it is dropped.")
    webhook_retry_for_s: float = Field(
        72 * 3600.0, ge=0, description="Seconds after a batch ends during which its webhook is retried."
    )
    webhook_backoff_s: float = Field(
        10.0, gt=0, description="Wait before the first retry; it doubles (with jitter) up to webhook_backoff_max_s."
    )
    webhook_backoff_max_s: float = Field(3600.0, gt=0, description="Longest wait between two webhook attempts.")
    public_url: str | None = Field(None, description="Base URL clients reach the API at (for status links).")
    reconcile_interval_s: float = Field(
        30.0,
        ge=0,
        description="Seconds between audits of open work against the broker (queueformer.server.reconcile); 0 turns "
        "them off. Work no message holds in two audits this far apart is sent again.",
    )
    liveness_interval_s: float = Field(
        1.0,
        ge=0,
        description="Seconds between sweeps for workers whose heartbeat stopped (queueformer.server.liveness): "
        "their messages go back to their queues; 0 turns them off (they come back after the visibility timeout).",
    )
    sync_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="How long synchronous routes (/v1/embeddings) wait for their job; then 504."
    )
    reconcile_after_s: float = Field(
        60.0, ge=0, description="How long open work must have made no progress before an audit looks for it."
    )
    history_interval_s: float = Field(
        10.0,
        ge=0,
        description="Seconds between samples of queue depths and generated tokens for the dashboard's last-hour "
        "plots (one replica samples per interval); 0 turns sampling off.",
    )
    file_sweep_interval_s: float = Field(
        60.0,
        ge=0,
        description="Seconds between sweeps that delete expired files from storage and Redis; 0 turns "
        "them off (expired files still answer 404).",
    )

    @field_validator("webhook_secret")
    @classmethod
    def _whsec_decodes(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None  # an empty secret file or variable means "unset", as it did before
        webhook_key(value.get_secret_value())
        return value

    @field_validator("webhook_allow")
    @classmethod
    def _allow_entries(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
                continue
            except ValueError:
                pass
            if not _HOST_PATTERN.fullmatch(entry.lower()):
                raise ValueError(f"{entry!r} is neither a CIDR, an address nor a host name (or *.domain)")
        return value


def webhook_key(secret: str) -> bytes:
    """The HMAC key a webhook secret stands for, read as Standard Webhooks libraries read it.

    ``whsec_<base64>`` is the spec's form: the key is the decoded base64 (padding optional). Any other
    string (what ``QUEUEFORMER_API__WEBHOOK_SECRET`` held before) is used as its UTF-8 bytes; a receiver
    then verifies with ``whsec_`` followed by the base64 of those bytes.
    """
    if not secret.startswith(WHSEC_PREFIX):
        return secret.encode()
    part = secret.removeprefix(WHSEC_PREFIX)
    if not re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", part):
        raise ValueError("a 'whsec_' webhook secret must be followed by standard base64")
    try:
        return base64.b64decode(part + "==")  # what the libraries do: padding may be left out
    except binascii.Error as exc:
        raise ValueError(f"the webhook secret's base64 does not decode: {exc}") from None


WHSEC_PREFIX = "whsec_"

# A host name, or "*." and a domain: what webhook_allow accepts besides networks.
_HOST_PATTERN = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?")


class TenantQuota(BaseModel):
    """Per-tenant limits: answered with 413 (too big) or 429 (too much enqueued)."""

    max_upload_bytes: int = Field(200 * 1024 * 1024, ge=1)
    max_lines_per_batch: int = Field(50_000, ge=1)
    max_enqueued_tokens: int = Field(
        20_000_000, ge=1, description="Estimated prompt + new tokens of unfinished work one tenant may have queued."
    )
    max_open_batches: int = Field(100, ge=1)
    max_line_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="Longest line of a batch input file, in bytes; a longer line is a per-line error (never read "
        "whole).",
    )
    max_stored_bytes: int = Field(
        10 * 1024**3,
        ge=1,
        description="Bytes of files (uploads and produced batch output) one tenant may keep in storage; an upload "
        "that would pass it gets 413. Deleting or expiring files gives the bytes back.",
    )
    file_expiry_s: int | None = Field(
        None,
        ge=60,
        description="Default expiry of uploaded files, in seconds after upload, when the upload gives no "
        "expires_after; unset: uploads are kept until deleted.",
    )


class WorkerSettings(BaseModel):
    """A worker process."""

    queues: list[str] = Field(default_factory=list, description="Queues (registered model queues) this worker serves.")
    concurrency: int = Field(8, ge=1, le=1024, description="Messages in flight at once, all feeding one engine.")
    health_port: int = Field(0, ge=0, le=65535, description="Port of /healthz, /readyz and /metrics; 0 picks none.")
    max_deliveries: int = Field(
        20,
        ge=1,
        le=1000,
        description="Deliveries of one job or line before it is quarantined as worker_lost, whatever its strikes: "
        "a backstop for losses no strike recorded. Worker deaths are judged by strikes (isolate_after_strikes).",
    )
    isolate_after_strikes: int = Field(
        2,
        ge=1,
        le=100,
        description="Worker deaths a job or line was executing at before it runs alone; one that then kills its "
        "worker twice running alone is quarantined as poison_input.",
    )
    memory_limit_mb: int = Field(
        0,
        ge=0,
        description="Resident memory (MiB) at which the worker exits at once, as a container past its memory limit "
        "is killed; 0: no limit. Its in-flight work is handed to other workers, and the input that drove it "
        "there is found by strikes and quarantined as poison_input.",
    )
    lease_renew_s: float = Field(
        0.0, ge=0, description="How often in-flight messages renew their lease; 0 = a third of the visibility timeout."
    )
    cancel_poll_steps: int = Field(8, ge=1, description="Decode steps between checks of cancel flags.")
    chunk_target_s: float = Field(
        2.0,
        gt=0,
        description=(
            "Seconds of work a batch chunk should hold, from the model's measured throughput; never fewer lines "
            "than fill two engine batches across a worker's consumer slots."
        ),
    )
    metrics_interval_s: float = Field(
        5.0, gt=0, le=300, description="How often a worker publishes its Prometheus samples to Redis for the API."
    )
    offload_folder: Path | None = None
    finetuned_cache_size: int = Field(2, ge=1, description="Fine-tuned models kept loaded at once on a serving worker.")


class Settings(BaseSettings):
    """Everything a queueformer process reads at startup."""

    model_config = SettingsConfigDict(
        env_prefix="QUEUEFORMER_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        validate_default=True,
    )

    redis_url: SecretStr | None = Field(
        None, description="Broker and state store. Unset: `queueformer up` starts an embedded Valkey server."
    )
    data_dir: Path = Field(Path(".queueformer"), description="Local state of `queueformer up`: Valkey data, logs.")
    storage_url: str | None = Field(
        None,
        description="Where files, results and checkpoints go: file:///path or s3://bucket/prefix "
        "(default: data_dir/storage).",
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options (e.g. S3 endpoint_url).")
    training_data_uris: list[str] = Field(
        default_factory=list,
        description="URI prefixes (e.g. s3://datasets/shared/) fine-tunes of every tenant may read training data "
        "from, besides the tenant's own uploaded files. Empty (the default): uploaded files only.",
    )
    registry: str = Field("tiny", description="Model registry: 'tiny', 'hub' (bundled) or a path to a YAML file.")
    models_dir: Path | None = Field(
        None, description="Base of relative model paths in the registry. Default: data_dir/models."
    )
    visibility_timeout_s: int = Field(
        3600, ge=10, description="Seconds before an unacknowledged message is redelivered; in-flight work renews it."
    )
    event_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="How long job records and event streams are kept.")
    limits: Limits = Field(default_factory=Limits)
    api: ApiSettings = Field(default_factory=ApiSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    quota: TenantQuota = Field(default_factory=TenantQuota)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Secret files follow the variables' names, nesting included: a file named
        # queueformer_api__bootstrap_keys sets api.bootstrap_keys, as the variable would.
        secrets = NestedSecretsSettingsSource(
            file_secret_settings, secrets_nested_delimiter="__", secrets_dir_missing="ok"
        )
        return init_settings, env_settings, dotenv_settings, secrets

    @field_validator("storage_url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            value = "file://" + str(Path(value).resolve())
        return value

    @field_validator("training_data_uris")
    @classmethod
    def _uri_prefixes(cls, value: list[str]) -> list[str]:
        out = []
        for prefix in value:
            scheme, sep, rest = prefix.partition("://")
            if not sep or not scheme or not rest or any(p in (".", "..") for p in rest.split("/")):
                raise ValueError(f"training data prefix {prefix!r} must be a URI like s3://bucket/dir/")
            # A prefix names a directory: s3://data/shared must not also allow s3://data/shared-private/...
            out.append(prefix if prefix.endswith("/") else prefix + "/")
        return out

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or "file://" + str((self.data_dir / "storage").resolve())

    @property
    def resolved_models_dir(self) -> Path:
        return (self.models_dir or self.data_dir / "models").resolve()

    def redis(self) -> str:
        """The Redis URL; a process that needs Redis fails fast here when none is configured."""
        if self.redis_url is None:
            raise RuntimeError("QUEUEFORMER_REDIS_URL is not set (only `queueformer up` starts an embedded server)")
        return self.redis_url.get_secret_value()


def _secrets_dir() -> str | None:
    path = os.environ.get("QUEUEFORMER_SECRETS_DIR", "/run/secrets")
    return path if Path(path).is_dir() else None


def load_settings(**overrides: Any) -> Settings:
    """Read settings now (env, .env, secrets dir); explicit keyword overrides win."""
    return Settings(_secrets_dir=_secrets_dir(), **overrides)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read on first call (at startup), never at import."""
    return load_settings()
