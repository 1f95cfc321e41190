"""Signed webhooks when a batch ends, in the Standard Webhooks shape OpenAI uses.

Body: ``{"id", "object": "event", "type": "batch.completed", "created_at", "data": {"id": batch_id}}``.
Headers ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">``, so receivers verify with any Standard Webhooks library.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from typing import Any

import httpx
from tenacity import retry, stop_after_attempt, wait_exponential

log = logging.getLogger(__name__)

EVENT_TYPES = {
    "completed": "batch.completed",
    "failed": "batch.failed",
    "cancelled": "batch.cancelled",
    "expired": "batch.expired",
}


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def event(batch: dict[str, Any]) -> dict[str, Any] | None:
    kind = EVENT_TYPES.get(batch.get("status", ""))
    if kind is None:
        return None
    return {
        "id": f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "type": kind,
        "created_at": int(time.time()),
        "data": {"id": batch["id"]},
    }


@retry(stop=stop_after_attempt(3), wait=wait_exponential(multiplier=0.5, max=10), reraise=True)
def _post(url: str, body: bytes, headers: dict[str, str]) -> None:
    httpx.post(url, content=body, headers=headers, timeout=10).raise_for_status()


def deliver(url: str, batch: dict[str, Any], secret: str | None) -> bool:
    """POST the batch's end event; failures are logged, never raised (the batch is already final)."""
    payload = event(batch)
    if payload is None:
        return False
    body = json.dumps(payload).encode()
    ts = int(time.time())
    headers = {"content-type": "application/json", "webhook-id": payload["id"], "webhook-timestamp": str(ts)}
    if secret:
        headers["webhook-signature"] = sign(secret, payload["id"], ts, body)
    try:
        _post(url, body, headers)
    except Exception:
        log.warning("webhook to %s for %s failed", url, batch.get("id"), exc_info=True)
        return False
    return True
