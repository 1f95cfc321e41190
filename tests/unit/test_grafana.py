"""The Grafana dashboard in docker/ asks only for series the cluster's /metrics exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from api import metrics as api_metrics
from workers import metrics as worker_metrics

ROOT = Path(__file__).resolve().parents[2]
# Families the API reads from Redis at scrape time (api.metrics.ClusterMetrics).
CLUSTER = {"queueformer_batches_open", "queueformer_batches_ended_total", "queueformer_open_batch_lines"}


def exported() -> set[str]:
    names = set(CLUSTER)
    for registry in (api_metrics.REGISTRY, worker_metrics.REGISTRY):
        for family in registry.collect():
            names.add(family.name)
            names.update(s.name for s in family.samples)
            if family.type == "histogram":
                names.add(family.name + "_bucket")
            if family.type == "counter":
                names.add(family.name + "_total")
    return names


def test_every_series_the_dashboard_plots_is_exported() -> None:
    worker_metrics.WAIT.labels("m", "job")  # histograms show their samples once a label set exists
    worker_metrics.FIRST_TOKEN.labels("m")
    dashboard = json.loads((ROOT / "docker" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:queueformer|process)_[a-z_]+)\b", e)}
    assert used and used <= exported(), used - exported()
    assert {"queueformer_job_wait_seconds_bucket", "queueformer_tokens_per_second"} <= used
