"""Tenants and their API keys. Keys are stored only as SHA-256 hashes; a leaked Redis leaks no key.

Every object (job, file, batch, fine-tuned model) carries its tenant, and every lookup is filtered by
it: another tenant's object is indistinguishable from one that does not exist.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import cast

import redis

from queueformer.server import keys

TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DEFAULT_TENANT = "default"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """Issue, resolve and revoke API keys."""

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
        p = self.r.pipeline()
        p.set(keys.api_key(h), tenant)
        p.sadd(keys.tenant_keys(tenant), h)
        p.execute()
        return key

    def resolve(self, key: str) -> str | None:
        h = hash_key(key)
        if h in self._static:
            return self._static[h]
        return cast(str | None, self.r.get(keys.api_key(h)))

    def revoke(self, key: str) -> bool:
        h = hash_key(key)
        tenant = cast(str | None, self.r.get(keys.api_key(h)))
        if tenant is None:
            return False
        p = self.r.pipeline()
        p.delete(keys.api_key(h))
        p.srem(keys.tenant_keys(tenant), h)
        p.execute()
        return True
