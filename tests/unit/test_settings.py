"""Settings come from the environment (prefix, nesting) and a secrets dir, read when asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from queueformer.contract.settings import load_settings


def test_prefix_and_nested_delimiter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUEUEFORMER_REDIS_URL", "redis://example:6379/3")
    monkeypatch.setenv("QUEUEFORMER_API__PORT", "9001")
    monkeypatch.setenv("QUEUEFORMER_LIMITS__MAX_NEW_TOKENS", "77")
    monkeypatch.setenv("QUEUEFORMER_WORKER__QUEUES", '["a", "b"]')
    s = load_settings()
    assert s.redis() == "redis://example:6379/3"
    assert s.api.port == 9001
    assert s.limits.max_new_tokens == 77
    assert s.worker.queues == ["a", "b"]


def test_secrets_dir_supplies_secret_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "queueformer_redis_url").write_text("redis://:s3cret@redis:6379/0")
    monkeypatch.setenv("QUEUEFORMER_SECRETS_DIR", str(secrets))
    monkeypatch.delenv("QUEUEFORMER_REDIS_URL", raising=False)
    (secrets / "queueformer_api__bootstrap_keys").write_text('["acme:k-123"]')
    (secrets / "queueformer_api__webhook_secret").write_text("whsec")
    s = load_settings()
    assert s.redis() == "redis://:s3cret@redis:6379/0"
    assert "s3cret" not in repr(s)
    assert [k.get_secret_value() for k in s.api.bootstrap_keys] == ["acme:k-123"]
    assert s.api.webhook_secret is not None and s.api.webhook_secret.get_secret_value() == "whsec"


def test_defaults_derive_paths_from_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUEUEFORMER_DATA_DIR", str(tmp_path / "d"))
    for var in ("QUEUEFORMER_STORAGE_URL", "QUEUEFORMER_MODELS_DIR", "QUEUEFORMER_REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings()
    assert s.resolved_storage_url == f"file://{tmp_path / 'd' / 'storage'}"
    assert s.resolved_models_dir == tmp_path / "d" / "models"
    with pytest.raises(RuntimeError, match="QUEUEFORMER_REDIS_URL"):
        s.redis()


def test_invalid_values_fail_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUEUEFORMER_API__PORT", "not-a-port")
    with pytest.raises(ValueError):
        load_settings()


def test_importing_settings_reads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import queueformer.contract.settings as mod

    monkeypatch.setenv("QUEUEFORMER_API__PORT", "not-a-port")
    importlib.reload(mod)  # would raise if settings were read at import
    mod.get_settings.cache_clear()
