"""Tenants and their API keys. Keys are stored only as SHA-256 hashes; a leaked Redis leaks no key.

Every object (job, file, batch, fine-tuned model) carries its tenant, and every lookup is filtered by
it: another tenant's object is indistinguishable from one that does not exist.

A key is named by its id, ``key_`` and the first 16 hex digits of its hash, so keys issued before ids
existed have one too; issued keys also record their tenant, creation time and a short prefix of the key
(``qf-`` and four characters, as consoles show), never the key itself. Revoking deletes the hash, so the
key stops working on the next request.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import cast

import redis

from queueformer.contract.priority import DEFAULT_BATCH_PRIORITY, DEFAULT_JOB_PRIORITY, MAX_PRIORITY, MIN_PRIORITY
from queueformer.server import keys

TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
KEY_ID_RE = re.compile(r"^key_[0-9a-f]{16}$")
DEFAULT_TENANT = "default"
PREFIX_CHARS = 7  # "qf-" and four characters of the random part


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key_hash: str) -> str:
    return f"key_{key_hash[:16]}"


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a key: never the key."""

    id: str
    tenant: str
    created_at: float | None  # None for keys issued before creation times were kept
    prefix: str | None
    source: str = "redis"  # or "settings" for bootstrap keys, which only settings can revoke


class KeyNotFound(LookupError):
    pass


class ApiKeys:
    """Issue, resolve, list and revoke API keys."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._static: dict[str, str] = {}

    def add_static(self, pairs: list[str]) -> None:
        """Accept ``tenant:key`` pairs from settings (hashed here, never stored in clear)."""
        for pair in pairs:
            tenant, sep, key = pair.partition(":")
            if not sep or not key or not TENANT_RE.fullmatch(tenant):
                raise ValueError("bootstrap keys must look like 'tenant:key' with a lowercase tenant name")
            self._static[hash_key(key)] = tenant

    def create(self, tenant: str) -> str:
        if not TENANT_RE.fullmatch(tenant):
            raise ValueError(f"tenant {tenant!r} must be lowercase letters, digits, '-' or '_'")
        key = "qf-" + secrets.token_urlsafe(32)
        h = hash_key(key)
        info = {"tenant": tenant, "created_at": time.time(), "prefix": key[:PREFIX_CHARS]}
        p = self.r.pipeline()
        p.set(keys.api_key(h), tenant)
        p.sadd(keys.tenant_keys(tenant), h)
        p.hset(keys.API_KEY_INFO, key_id(h), json.dumps(info))
        p.execute()
        return key

    def resolve(self, key: str) -> str | None:
        h = hash_key(key)
        if h in self._static:
            return self._static[h]
        return cast(str | None, self.r.get(keys.api_key(h)))

    def list(self, tenant: str | None = None) -> list[KeyInfo]:
        """Keys of ``tenant`` (or of every tenant), oldest first; bootstrap keys from settings included."""
        if tenant is not None:
            hashes = sorted(cast(set[str], self.r.smembers(keys.tenant_keys(tenant))))
        else:
            prefix = keys.api_key("")
            hashes = sorted(k[len(prefix) :] for k in self.r.scan_iter(match=keys.API_KEYS_PATTERN, count=1000))
        out: list[KeyInfo] = []
        if hashes:
            owners = cast(list[str | None], self.r.mget([keys.api_key(h) for h in hashes]))
            infos = cast(list[str | None], self.r.hmget(keys.API_KEY_INFO, [key_id(h) for h in hashes]))
            for h, owner, raw in zip(hashes, owners, infos, strict=True):
                if owner is None:
                    continue  # revoked meanwhile
                meta = json.loads(raw) if raw else {}
                out.append(KeyInfo(key_id(h), owner, meta.get("created_at"), meta.get("prefix")))
        for h, owner in self._static.items():
            if tenant is None or owner == tenant:
                out.append(KeyInfo(key_id(h), owner, None, None, source="settings"))
        return sorted(out, key=lambda k: (k.created_at is None, k.created_at or 0.0, k.tenant, k.id))

    def find(self, key_or_id: str) -> str:
        """The hash of a stored key given the key itself or its id; ``KeyNotFound`` otherwise."""
        if KEY_ID_RE.fullmatch(key_or_id):
            stem = key_or_id.removeprefix("key_")
            found = list(self.r.scan_iter(match=keys.api_key(stem + "*"), count=1000))
            if len(found) != 1:
                raise KeyNotFound(f"no API key with id {key_or_id}")
            return found[0].removeprefix(keys.api_key(""))
        h = hash_key(key_or_id)
        if self.r.exists(keys.api_key(h)):
            return h
        raise KeyNotFound("no such API key")

    def revoke(self, key_or_id: str) -> KeyInfo:
        """Revoke a key given itself or its id; it stops working on the next request."""
        if hash_key(key_or_id) in self._static or key_or_id in {key_id(h) for h in self._static}:
            raise KeyNotFound(
                "that is a bootstrap key from settings: remove it from QUEUEFORMER_API__BOOTSTRAP_KEYS to revoke it"
            )
        h = self.find(key_or_id)
        tenant = cast(str | None, self.r.get(keys.api_key(h)))
        if tenant is None:
            raise KeyNotFound("no such API key")
        raw = cast(str | None, self.r.hget(keys.API_KEY_INFO, key_id(h)))
        meta = json.loads(raw) if raw else {}
        p = self.r.pipeline()
        p.delete(keys.api_key(h))
        p.srem(keys.tenant_keys(tenant), h)
        p.hdel(keys.API_KEY_INFO, key_id(h))
        p.execute()
        return KeyInfo(key_id(h), tenant, meta.get("created_at"), meta.get("prefix"))


@dataclass(frozen=True)
class Defaults:
    """A tenant's defaults for work submitted without them."""

    priority: int = DEFAULT_JOB_PRIORITY
    batch_priority: int = DEFAULT_BATCH_PRIORITY


class TenantDefaults:
    """Per-tenant defaults kept in the tenant's record (one Redis hash), read on every submission."""

    FIELDS = ("priority", "batch_priority")

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def get(self, tenant: str) -> Defaults:
        raw = cast(list[str | None], self.r.hmget(keys.tenant_record(tenant), list(self.FIELDS)))
        base = Defaults()
        job, batch = (int(v) if v is not None else None for v in raw)
        return Defaults(
            priority=base.priority if job is None else job,
            batch_priority=base.batch_priority if batch is None else batch,
        )

    def set(self, tenant: str, *, priority: int | None = None, batch_priority: int | None = None) -> Defaults:
        """Set either default (``None`` leaves it as is); returns the tenant's defaults now."""
        if not TENANT_RE.fullmatch(tenant):
            raise ValueError(f"tenant {tenant!r} must be lowercase letters, digits, '-' or '_'")
        fields = {k: v for k, v in zip(self.FIELDS, (priority, batch_priority), strict=True) if v is not None}
        for name, value in fields.items():
            if not MIN_PRIORITY <= value <= MAX_PRIORITY:
                raise ValueError(f"{name} must be {MIN_PRIORITY} to {MAX_PRIORITY} (higher first), not {value}")
        if fields:
            self.r.hset(keys.tenant_record(tenant), mapping={k: str(v) for k, v in fields.items()})
        return self.get(tenant)

    def reset(self, tenant: str) -> None:
        self.r.hdel(keys.tenant_record(tenant), *self.FIELDS)
