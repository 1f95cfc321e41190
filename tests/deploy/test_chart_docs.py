"""The chart documents itself: every values key has a `## @param`, the schema and values.yaml agree, and
docs/deploy.md covers what the issue asks of it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import yaml

from tests.deploy.conftest import CHART, GPU_VALUES, ROOT

VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
DOCUMENTED = set(re.findall(r"^\s*## @param (\S+)", VALUES_TEXT, re.MULTILINE))


def undocumented(node: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Keys with no @param of their own. A documented mapping is documented as a whole (free-form maps
    such as resources or podSecurityContext); an undocumented one must document each of its keys."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if path in DOCUMENTED:
            continue
        if isinstance(value, dict) and value:
            yield from undocumented(value, path + ".")
        else:
            yield path


def paths(node: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in node.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from paths(value, f"{prefix}{key}.")


def test_every_values_key_is_documented() -> None:
    assert list(undocumented(VALUES)) == []
    assert len(DOCUMENTED) > 100


def test_no_param_documents_a_key_that_does_not_exist() -> None:
    assert DOCUMENTED - set(paths(VALUES)) == set()


def test_values_files_validate_against_the_schema() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    for values in (VALUES, yaml.safe_load(GPU_VALUES.read_text())):
        jsonschema.validate(values, SCHEMA)


# Keys the schema allows that values.yaml leaves out on purpose (optional, no sensible default).
OPTIONAL = {"registry.fineTune.bases", "workers.defaults.name", "workers.defaults.queues"}


def test_schema_and_values_have_the_same_keys() -> None:
    """Each object the schema closes (additionalProperties: false) lists exactly the keys values.yaml has."""

    def walk(schema: dict[str, Any], values: Any, where: str) -> Iterator[str]:
        if "$ref" in schema:
            schema = SCHEMA["definitions"][schema["$ref"].rsplit("/", 1)[-1]]
        if schema.get("additionalProperties") is False and isinstance(values, dict):
            for key in sorted(set(schema.get("properties", {})) ^ set(values)):
                path = f"{where}.{key}".lstrip(".")
                if key != "global" and path not in OPTIONAL and not path.endswith(".resources.claims"):
                    yield path
            for key, sub in schema["properties"].items():
                if key in values:
                    yield from walk(sub, values[key], f"{where}.{key}".lstrip("."))

    assert list(walk(SCHEMA, VALUES, "")) == []


def test_worker_set_keys_are_all_described() -> None:
    set_keys = set(SCHEMA["definitions"]["workerSet"]["properties"])
    assert set(VALUES["workers"]["defaults"]) == set_keys - {"name", "queues"}
    sets_doc = next(line for line in VALUES_TEXT.splitlines() if "@param workers.sets " in line)
    for key in set_keys:
        assert f"`{key}`" in sets_doc, key


def test_deploy_docs_cover_the_quickstart() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    for needle in (
        "helm install",
        "helm test",
        "gpu-sets-values.yaml",
        "externalRedis.existingSecret",
        "storage.url",
        "keda",
        "terminationGracePeriodSeconds",
        "preStop",
        "docker compose -f docker/compose.yaml",
        "make-secrets.sh",
        "minReplicaCount: 0",
        "networkPolicy.api.allowFrom",
        "networkPolicy.monitoringFrom",
        "egress.storage",
        "does not cross the pod network",
        "qf-queueformer-api -o jsonpath='{.data.bootstrap-keys}'",
        "qf-queueformer-flower -o jsonpath='{.data.basic-auth}'",
    ):
        assert needle in text, needle
    assert "[deployment](docs/deploy.md)" in (ROOT / "README.md").read_text()
