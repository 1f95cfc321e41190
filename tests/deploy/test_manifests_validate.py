"""Rendered manifests against Kubernetes' own schemas (kubernetes-validate, strict, 1.34), and proof
that the checks bite: a broken template, a wrong value type or a wrong field type makes them fail.

kubernetes-validate answers "WARN ... Couldn't find schema" and exit code 0 for kinds it has no schema
for (CRDs). So the CRD kinds are taken out explicitly (and checked structurally in test_helm_chart.py),
and any WARN, or any resource that is not reported as passed, fails the test.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import CHART, GPU_VALUES, RELEASE, Manifest, run

# Custom resources kubernetes-validate has no schema for: excluded on purpose, never silently.
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PodMonitor"}
PASSED = re.compile(r"^INFO (\S+) passed for resource (\S+) against version 1\.34$")


def write_manifests(manifests: list[Manifest], directory: Path) -> tuple[list[Path], list[str]]:
    """One file per non-CRD manifest; returns the files and the CRD kinds left out."""
    directory.mkdir(parents=True, exist_ok=True)
    files, skipped = [], []
    for i, manifest in enumerate(manifests):
        if manifest["kind"] in CRD_KINDS:
            skipped.append(manifest["kind"])
            continue
        path = directory / f"{i:03d}-{manifest['kind'].lower()}-{manifest['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
        files.append(path)
    return files, skipped


def validate(kubernetes_validate: Path, files: list[Path]) -> tuple[int, str, set[str]]:
    assert files, "nothing to validate"
    result = run([kubernetes_validate, "--strict", "-k", "1.34.0", *files], timeout=300)
    passed = {m.group(2) for line in result.stdout.splitlines() if (m := PASSED.match(line))}
    return result.returncode, result.stdout + result.stderr, passed


@pytest.mark.parametrize("which", ["defaults", "gpu-sets"])
def test_rendered_manifests_validate_strictly_against_kubernetes_1_34(
    which: str,
    default_manifests: list[Manifest],
    gpu_manifests: list[Manifest],
    kubernetes_validate: Path,
    tmp_path: Path,
) -> None:
    manifests = default_manifests if which == "defaults" else gpu_manifests
    files, skipped = write_manifests(manifests, tmp_path)
    code, output, passed = validate(kubernetes_validate, files)
    assert code == 0, output
    assert "WARN" not in output and "ERROR" not in output, output
    expected = {f"{m['kind'].lower()}/{m['metadata']['name']}" for m in manifests if m["kind"] not in CRD_KINDS}
    assert passed == expected, f"not reported as validated: {expected - passed}"
    assert len(passed) >= 15
    kinds = {m["kind"] for m in manifests if m["kind"] not in CRD_KINDS}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "Pod"} <= kinds
    if which == "gpu-sets":
        assert sorted(set(skipped)) == sorted(CRD_KINDS), "the GPU values must render every CRD kind"
        assert {"HorizontalPodAutoscaler", "Ingress", "PersistentVolumeClaim"} <= kinds
    else:
        assert skipped == []


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["spec"].__setitem__("replicas", "two"), "'two' is not of type 'integer'"),
        (
            lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("gpuCount", 1),
            "'gpuCount' was unexpected",
        ),
        (
            lambda d: d["spec"]["template"]["spec"].__setitem__("terminationGracePeriodSeconds", "1h"),
            "'1h' is not of type 'integer'",
        ),
    ],
    ids=["replicas-string", "unknown-field", "grace-string"],
)
def test_kubernetes_validate_rejects_a_wrong_field(
    mutate, message: str, default_manifests: list[Manifest], kubernetes_validate: Path, tmp_path: Path
) -> None:
    worker = next(m for m in default_manifests if m["kind"] == "Deployment" and m["metadata"]["name"].endswith("-tiny"))
    broken = yaml.safe_load(yaml.safe_dump(worker))
    mutate(broken)
    files, _ = write_manifests([broken], tmp_path)
    code, output, passed = validate(kubernetes_validate, files)
    assert code != 0, output
    assert message in output
    assert passed == set()


def copy_chart(tmp_path: Path) -> Path:
    chart = tmp_path / "queueformer"
    shutil.copytree(CHART, chart)
    return chart


@pytest.mark.parametrize(
    ("template", "corruption"),
    [
        ("api-service.yaml", "{{ if .Values.api.service.port }}\n"),  # an unclosed action
        ("worker-deployment.yaml", '{{ include "queueformer.noSuchHelper" . }}\n'),  # an unknown template
        ("configmap.yaml", "  broken: [unclosed\n"),  # renders, but is not YAML
    ],
    ids=["unclosed-if", "unknown-include", "invalid-yaml"],
)
def test_a_broken_template_fails_lint_and_template(helm: Path, tmp_path: Path, template: str, corruption: str) -> None:
    chart = copy_chart(tmp_path)
    path = chart / "templates" / template
    path.write_text(path.read_text() + corruption)
    lint = run([helm, "lint", "--strict", chart])
    assert lint.returncode != 0, lint.stdout
    assert "1 chart(s) failed" in lint.stdout + lint.stderr
    assert template in lint.stdout  # the failure names the broken file
    rendered = run([helm, "template", RELEASE, chart])
    assert rendered.returncode != 0
    assert "Error" in rendered.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "api.replicas=two"], "at '/api/replicas': got string, want integer"),
        (["--set-json", 'workers.sets=[{"name":"x","queues":"echo"}]'], "at '/workers/sets/0/queues': got string"),
        (["--set-json", 'workers.sets=[{"name":"x"}]'], "missing property 'queues'"),
        (["--set-json", 'workers.sets=[{"queues":["echo"]}]'], "missing property 'name'"),
        (["--set-json", 'workers.sets=[{"name":"x","queues":["echo"],"gpus":1}]'], "'gpus' not allowed"),
        (["--set-json", 'workers.sets=[{"name":"x","queues":["echo"],"gpu":-1}]'], "minimum"),
        (["--set", "redis.appendfsync=no"], "/redis/appendfsync"),
    ],
    ids=["replicas", "queues-type", "no-queues", "no-name", "unknown-key", "negative-gpu", "fsync-off"],
)
def test_values_schema_rejects_wrong_types(helm: Path, args: list[str], message: str) -> None:
    result = run([helm, "template", RELEASE, CHART, *args])
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def test_lint_fails_on_a_values_file_with_a_wrong_type(helm: Path, tmp_path: Path) -> None:
    values = yaml.safe_load(GPU_VALUES.read_text())
    values["workers"]["sets"][0]["gpu"] = "one"
    bad = tmp_path / "bad-values.yaml"
    bad.write_text(yaml.safe_dump(values))
    result = run([helm, "lint", "--strict", CHART, "-f", bad])
    assert result.returncode != 0
    assert "at '/workers/sets/0/gpu': got string, want integer" in result.stdout + result.stderr
