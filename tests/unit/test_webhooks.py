"""Webhook secrets, signatures, URLs and the retry schedule, without a network."""

from __future__ import annotations

import base64
import json
import time

import pytest
from pydantic import ValidationError
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from queueformer.contract.openai_batch import BatchCreate, BatchStatus
from queueformer.contract.settings import ApiSettings, webhook_key
from queueformer.server.webhooks import DeliveryConfig, new_event, sign

KEY = bytes(range(32))
WHSEC = "whsec_" + base64.b64encode(KEY).decode()


def test_a_whsec_secret_is_its_decoded_base64_and_a_plain_one_its_bytes() -> None:
    assert webhook_key(WHSEC) == KEY
    assert webhook_key(WHSEC.rstrip("=")) == KEY  # padding may be left out, as the libraries allow
    assert webhook_key("an-old-plain-secret") == b"an-old-plain-secret"
    for bad in ("whsec_", "whsec_not base64!", "whsec_YWJj$"):
        with pytest.raises(ValueError, match="base64"):
            webhook_key(bad)
    with pytest.raises(ValidationError, match="base64"):
        ApiSettings(webhook_secret="whsec_***")  # fails at startup, not at the first webhook
    assert ApiSettings(webhook_secret="").webhook_secret is None  # an empty secret file means unset


@pytest.mark.parametrize("secret", [WHSEC, "an-old-plain-secret"])
def test_signatures_verify_with_the_standardwebhooks_library(secret: str) -> None:
    event_id, kind, body = new_event("batch_abc123", BatchStatus.COMPLETED) or ("", "", "")
    ts = int(time.time())
    headers = {
        "webhook-id": event_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(webhook_key(secret), event_id, ts, body.encode()),
    }
    # A plain secret's receiver configures whsec_ + the base64 of its bytes (docs/reliability.md).
    configured = secret if secret.startswith("whsec_") else "whsec_" + base64.b64encode(secret.encode()).decode()
    payload = Webhook(configured).verify(body, headers)
    assert payload == json.loads(body) and payload["type"] == kind == "batch.completed"
    assert payload["data"] == {"id": "batch_abc123"} and payload["id"] == event_id
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"another key").decode()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(configured).verify(body.replace("completed", "cancelled"), headers)


def test_only_ends_have_events() -> None:
    assert {s for s in BatchStatus if new_event("batch_x", s)} == {s for s in BatchStatus if s.ended}
    a, b = new_event("batch_x", BatchStatus.FAILED), new_event("batch_x", BatchStatus.FAILED)
    assert a and b and a[0] != b[0] and a[0].startswith("evt_")


BAD_URLS = [
    ("ftp://hooks.example.com/x", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("gopher://hooks.example.com:70/", "http:// or https://"),
    ("javascript:alert(1)", "http:// or https://"),
    ("//hooks.example.com/x", "http:// or https://"),
    ("https://user:pass@hooks.example.com/x", "credentials"),
    ("https://token@hooks.example.com/x", "credentials"),
    ("http://evil.example.com\\@127.0.0.1/", "credentials"),
    ("https:///x", "no host"),
    ("https://hooks.example.com:0/", "port"),
    ("https://hooks.example.com:65536/", "port"),
    ("https://hooks.example.com:http/", "port"),
    ("https://hooks.example.com/a b", "spaces"),
    ("https://hooks.example.com/\r\nX-Injected: 1", "spaces"),
    ("https://bücher.example/x", "ASCII"),
    ("https://hooks.example.com/" + "a" * 2100, "2048"),
]


@pytest.mark.parametrize(("url", "why"), BAD_URLS, ids=[u[:60] for u, _ in BAD_URLS])
def test_a_bad_webhook_url_is_refused_naming_the_field(url: str, why: str) -> None:
    with pytest.raises(ValidationError) as exc:
        BatchCreate(input_file_id="file-abc12345", endpoint="/v1/jobs", webhook_url=url)
    (error,) = exc.value.errors()
    assert error["loc"] == ("webhook_url",) and why in error["msg"]


def test_good_webhook_urls_pass() -> None:
    for url in ("https://hooks.example.com/x?sig=1", "HTTP://Hooks.Example.com:8080/", "https://[2001:db8::1]/x"):
        assert BatchCreate(input_file_id="file-abc12345", endpoint="/v1/jobs", webhook_url=url).webhook_url == url


def test_the_allowlist_setting_takes_networks_and_names_only() -> None:
    ok = ["10.0.0.0/8", "192.168.1.5", "fd00::/8", "hooks.internal", "*.svc.cluster.local", "Hooks.Example.COM."]
    assert ApiSettings(webhook_allow=ok).webhook_allow == ok
    for bad in ("http://hooks.internal", "10.0.0.0/33", "*", "a b", "*.", "hooks.internal/x"):
        with pytest.raises(ValidationError):
            ApiSettings(webhook_allow=[bad])


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    config = DeliveryConfig(backoff_s=10, backoff_max_s=300)
    waits = [config.backoff(n) for n in range(1, 10)]
    for n, wait in enumerate(waits, start=1):
        expected = min(300, 10 * 2 ** (n - 1))
        assert 0.9 * expected <= wait <= 1.1 * expected
    assert config.backoff(10_000) <= 330  # no overflow far down the schedule
