"""The documentation keeps up with the code: every limit and setting is documented."""

from __future__ import annotations

from pathlib import Path

from queueformer.contract.limits import Limits
from queueformer.contract.settings import ApiSettings, Settings, TenantQuota, WorkerSettings

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_setting_and_limit_is_in_the_configuration_reference() -> None:
    text = (DOCS / "configuration.md").read_text()
    groups = {
        "": Settings,
        "API__": ApiSettings,
        "WORKER__": WorkerSettings,
        "QUOTA__": TenantQuota,
        "LIMITS__": Limits,
    }
    missing = [
        f"QUEUEFORMER_{prefix}{name.upper()}"
        for prefix, model in groups.items()
        for name in model.model_fields
        if name not in ("limits", "api", "worker", "quota") and f"QUEUEFORMER_{prefix}{name.upper()}" not in text
    ]
    assert missing == []


def test_readme_names_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (DOCS.parent / "README.md").read_text()
    ci = (DOCS.parent / ".ci" / "run").read_text()
    assert "make demo" in readme and "make test" in readme
    assert ci.strip().splitlines()[-1] == "make test"
