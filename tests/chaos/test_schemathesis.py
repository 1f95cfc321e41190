"""Schemathesis, every check, against a real API process with auth required: 0 failures.

The API runs as `uvicorn` on an embedded Valkey of the test's own with two tenants' bootstrap keys, no
workers (jobs stay queued). Schemathesis's own runner drives it with ``--checks all``: server errors,
status codes, content types, headers and bodies against the OpenAPI document, schema-invalid requests
that must be refused, schema-valid ones that must be accepted, missing auth, unsupported methods (405
with ``Allow``), use after delete and resources a create announces, over every operation (the event
streams included) and through the stateful phase, which follows the links between operations. Its JSON
report gives the numbers the test prints.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from queueformer.server.cluster import Cluster
from queueformer.server.embedded import EmbeddedRedis
from tests.conftest import free_port
from tests.helpers import make_settings

KEY = "qf-acme-bootstrap-key-0001"
OTHER = "qf-globex-bootstrap-key-001"
EXAMPLES = 10  # per operation in fuzzing; the coverage and stateful phases add their own (~3,700 cases in all)
SEED = 20261201  # a fixed seed: the same requests on every run, so a failure reproduces


@pytest.fixture
def api_url(own_redis: EmbeddedRedis, tmp_path: Path) -> Iterator[str]:
    settings = make_settings(own_redis.url, tmp_path)
    env = {
        "QUEUEFORMER_API__AUTH_REQUIRED": "true",
        "QUEUEFORMER_API__BOOTSTRAP_KEYS": json.dumps([f"acme:{KEY}", f"globex:{OTHER}"]),
    }
    cluster = Cluster(settings, api_port=free_port(), worker_groups=[], env=env)
    with cluster.running(timeout=120):
        yield cluster.api_url


def run_schemathesis(api_url: str, report: Path) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).parent / "schemathesis"
    cmd = [
        str(cli),
        "--config-file",
        str(Path(__file__).with_name("schemathesis.toml")),
        "run",
        f"{api_url}/openapi.json",
        "--checks",
        "all",
        "--header",
        f"Authorization: Bearer {KEY}",
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    # Run from the report's folder: schemathesis keeps a cache (and replays its past crashes) where it starts.
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False, cwd=report.parent)


def test_schemathesis_with_every_check_finds_nothing(api_url: str, tmp_path: Path) -> None:
    report_path = tmp_path / "schemathesis.json"
    proc = run_schemathesis(api_url, report_path)
    report: dict[str, Any] = json.loads(report_path.read_text())
    ops, cases = report["operations"], report["test_cases"]
    failures = sum(f["count"] for f in report["failures"])
    print(
        f"schemathesis {report['schemathesis_version']}: {ops['tested']}/{ops['total']} operations, "
        f"{cases['generated']} test cases, {failures} failures, {len(report['errors'])} errors, "
        f"{report['running_time']:.0f}s; phases "
        + ", ".join(f"{name} {phase['status']}" for name, phase in report["phases"].items())
    )
    assert proc.returncode == 0 and failures == 0 and not report["errors"], proc.stdout[-20_000:]
    assert ops["tested"] == ops["total"] >= 30 and not ops["errored"], ops
    # The schema gives no examples (a model name in one would be tried for every task), so that phase skips.
    phases = {name: phase["status"] for name, phase in report["phases"].items()}
    assert phases == {"examples": "skip", "coverage": "success", "fuzzing": "success", "stateful": "success"}, phases
    assert cases["generated"] > 500, cases
