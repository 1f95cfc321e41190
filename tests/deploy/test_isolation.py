"""What each pod may reach and read: the chart's NetworkPolicies select the right pods and open only the
documented paths, each pod references only the secrets it uses, and Redis always requires a password
that every URL the chart builds carries.

Policies are checked by evaluating their selectors against the pod templates the chart renders, the
way a network plugin would, rather than by comparing YAML text.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.deploy.conftest import (
    CHART,
    GPU_VALUES,
    NAMESPACE,
    RELEASE,
    Manifest,
    Render,
    container,
    env_of,
    named,
    of_kind,
    run,
    workers,
)

FULL = f"{RELEASE}-queueformer"
COMPONENTS = ("api", "worker", "flower", "redis", "test")
API_ONLY_ENV = {"QUEUEFORMER_API__WEBHOOK_SECRET", "QUEUEFORMER_API__BOOTSTRAP_KEYS"}
STORAGE_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


# --- helpers -------------------------------------------------------------------------------------


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a set of labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pods(manifests: list[Manifest]) -> dict[str, tuple[dict[str, str], dict[str, Any]]]:
    """workload name -> (pod labels, pod spec), for every Deployment, StatefulSet and bare Pod."""
    out = {}
    for m in manifests:
        if m["kind"] in ("Deployment", "StatefulSet"):
            out[m["metadata"]["name"]] = (m["spec"]["template"]["metadata"]["labels"], m["spec"]["template"]["spec"])
        elif m["kind"] == "Pod":
            out[m["metadata"]["name"]] = (m["metadata"]["labels"], m["spec"])
    return out


def component_of(labels: dict[str, str]) -> str:
    return labels["app.kubernetes.io/component"]


def policies(manifests: list[Manifest]) -> dict[str, Manifest]:
    """NetworkPolicies by the component their name ends in."""
    return {m["metadata"]["name"].removeprefix(f"{FULL}-"): m for m in of_kind(manifests, "NetworkPolicy")}


def peer_admits(peer: dict[str, Any], labels: dict[str, str], namespace: dict[str, str]) -> bool:
    """Does a NetworkPolicyPeer admit a pod with these labels in a namespace with these labels?"""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], namespace):
            return False
    elif namespace.get("kubernetes.io/metadata.name") != NAMESPACE:
        return False  # a bare podSelector means the policy's own namespace
    return "podSelector" not in peer or matches(peer["podSelector"], labels)


def admitted(rules: list[dict[str, Any]], key: str, labels: dict[str, str], namespace: str, port: int) -> bool:
    """Is a pod (labels, namespace) allowed to/from on `port` by any of these ingress/egress rules?"""
    ns = {"kubernetes.io/metadata.name": namespace}
    for rule in rules:
        ports = rule.get("ports")
        if ports and not any(p["port"] == port for p in ports):
            continue
        peers = rule.get(key)
        if not peers or any(peer_admits(peer, labels, ns) for peer in peers):
            return True
    return False


def secret_refs(pod: dict[str, Any]) -> set[str]:
    """Every Secret a pod spec names: env, envFrom, volumes and projected volumes."""
    names: set[str] = set()
    for c in pod.get("initContainers", []) + pod["containers"]:
        for e in c.get("env", []):
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for source in c.get("envFrom", []):
            if "secretRef" in source:
                names.add(source["secretRef"]["name"])
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in (volume.get("projected") or {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    return names


def env_names(pod: dict[str, Any]) -> set[str]:
    return {e["name"] for c in pod.get("initContainers", []) + pod["containers"] for e in c.get("env", [])}


# --- NetworkPolicy --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["defaults", "gpu-sets"])
def manifests(request: pytest.FixtureRequest, default_manifests: list[Manifest], gpu_manifests: list[Manifest]) -> Any:
    return default_manifests if request.param == "defaults" else gpu_manifests


def test_every_pod_is_isolated_by_the_policy_of_its_own_component(manifests: list[Manifest]) -> None:
    by_component = policies(manifests)
    assert sorted(by_component) == sorted(COMPONENTS)
    every_pod = pods(manifests)
    assert len(every_pod) >= 5
    for name, (labels, _) in every_pod.items():
        selecting = [c for c, p in by_component.items() if matches(p["spec"]["podSelector"], labels)]
        assert selecting == [component_of(labels)], name
    for component, policy in by_component.items():
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"], component
        selected = [n for n, (labels, _) in every_pod.items() if matches(policy["spec"]["podSelector"], labels)]
        assert selected, f"the {component} policy selects no pod"
        # Policies never reach into another release in the namespace.
        assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE


def test_redis_accepts_only_the_api_workers_and_flower(manifests: list[Manifest]) -> None:
    redis = policies(manifests)["redis"]["spec"]
    assert redis["egress"] == []  # Valkey connects nowhere
    for name, (labels, _) in pods(manifests).items():
        allowed = admitted(redis["ingress"], "from", labels, NAMESPACE, 6379)
        assert allowed == (component_of(labels) in ("api", "worker", "flower")), name
        assert not admitted(redis["ingress"], "from", labels, NAMESPACE, 6380), name
    stranger = {"app.kubernetes.io/name": "queueformer", "app.kubernetes.io/component": "api"}
    assert not admitted(redis["ingress"], "from", {**stranger, "app.kubernetes.io/instance": "other"}, NAMESPACE, 6379)
    assert not admitted(redis["ingress"], "from", {"app": "debug"}, NAMESPACE, 6379)
    assert not admitted(redis["ingress"], "from", {}, "monitoring", 6379)


def test_workers_accept_only_metrics_scrapes_from_the_monitoring_namespace(manifests: list[Manifest]) -> None:
    worker = policies(manifests)["worker"]["spec"]
    assert admitted(worker["ingress"], "from", {"app": "prometheus"}, "monitoring", 9100)
    assert not admitted(worker["ingress"], "from", {"app": "prometheus"}, "monitoring", 8000)
    for name, (labels, _) in pods(manifests).items():
        assert not admitted(worker["ingress"], "from", labels, NAMESPACE, 9100), name
    assert not admitted(worker["ingress"], "from", {}, "ingress-nginx", 9100)
    # The health port in the policy is the one the worker containers listen on.
    for deployment in workers(manifests).values():
        ports = container(deployment, "worker")["ports"]
        assert ports == [{"name": "health", "containerPort": 9100, "protocol": "TCP"}]


def test_flower_is_closed_unless_sources_are_allowed(manifests: list[Manifest], render: Render) -> None:
    flower = policies(manifests)["flower"]["spec"]
    assert flower["ingress"] == []  # port-forward only
    opened = policies(
        render(
            "--set-json",
            'networkPolicy.flower.allowFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"ops"}}}]',
        )
    )["flower"]["spec"]
    assert admitted(opened["ingress"], "from", {}, "ops", 5555)
    assert not admitted(opened["ingress"], "from", {}, "ops", 6379)
    assert not admitted(opened["ingress"], "from", {}, "default", 5555)


def test_api_port_is_open_to_allowed_sources(default_manifests: list[Manifest], gpu_manifests: list[Manifest]) -> None:
    anywhere = policies(default_manifests)["api"]["spec"]
    assert admitted(anywhere["ingress"], "from", {}, "anything", 8000)
    assert not admitted(anywhere["ingress"], "from", {}, "anything", 9100)
    # The GPU example restricts the API to the ingress controller; Prometheus and `helm test` stay in.
    restricted = policies(gpu_manifests)["api"]["spec"]
    assert admitted(restricted["ingress"], "from", {"app": "controller"}, "ingress-nginx", 8000)
    assert admitted(restricted["ingress"], "from", {"app": "prometheus"}, "monitoring", 8000)
    test_labels = pods(gpu_manifests)[f"{FULL}-test-echo"][0]
    assert admitted(restricted["ingress"], "from", test_labels, NAMESPACE, 8000)
    assert not admitted(restricted["ingress"], "from", {}, "default", 8000)
    worker_labels = next(iter(pods(gpu_manifests)[n][0] for n in pods(gpu_manifests) if "-worker-" in n))
    assert not admitted(restricted["ingress"], "from", worker_labels, NAMESPACE, 8000)


def test_egress_is_redis_dns_and_storage_only(manifests: list[Manifest]) -> None:
    by_component = policies(manifests)
    every_pod = pods(manifests)
    redis_labels = every_pod[f"{FULL}-redis"][0]
    dns = {"k8s-app": "kube-dns"}
    for component in ("api", "worker", "flower"):
        egress = by_component[component]["spec"]["egress"]
        assert admitted(egress, "to", redis_labels, NAMESPACE, 6379), component
        assert admitted(egress, "to", dns, "kube-system", 53), component
        assert not admitted(egress, "to", dns, "default", 53), component
        assert not admitted(egress, "to", {"app": "anything"}, "default", 6379), component
        # No pod reaches the workers' or the API's ports.
        for target, port in (("worker", 9100), ("api", 8000)):
            labels = next(lbl for lbl, _ in every_pod.values() if component_of(lbl) == target)
            assert not admitted(egress, "to", labels, NAMESPACE, port), (component, target)
    for component in ("api", "worker"):
        # Object storage (and the hub, https webhooks) is outside the cluster: 443 to anywhere.
        rules = [
            r for r in by_component[component]["spec"]["egress"] if r["ports"] == [{"port": 443, "protocol": "TCP"}]
        ]
        assert rules == [{"ports": [{"port": 443, "protocol": "TCP"}]}], component
    assert not admitted(by_component["flower"]["spec"]["egress"], "to", {}, "anything", 443)
    test = by_component["test"]["spec"]
    api_labels = every_pod[f"{FULL}-api"][0]
    assert admitted(test["egress"], "to", api_labels, NAMESPACE, 8000)
    assert not admitted(test["egress"], "to", redis_labels, NAMESPACE, 6379)
    assert test["ingress"] == []


def test_keda_reaches_redis_only_when_a_set_uses_it(
    default_manifests: list[Manifest], gpu_manifests: list[Manifest]
) -> None:
    keda = {"app": "keda-operator"}
    assert not admitted(policies(default_manifests)["redis"]["spec"]["ingress"], "from", keda, "keda", 6379)
    assert admitted(policies(gpu_manifests)["redis"]["spec"]["ingress"], "from", keda, "keda", 6379)


def test_network_policies_follow_their_values(render: Render) -> None:
    assert not of_kind(render("--set", "networkPolicy.enabled=false"), "NetworkPolicy")

    external = policies(
        render(
            "--set",
            "redis.enabled=false",
            "--set",
            "externalRedis.existingSecret=r",
            "--set-json",
            'networkPolicy.egress.externalRedis.to=[{"ipBlock":{"cidr":"10.20.0.0/16"}}]',
            "--set-json",
            'networkPolicy.egress.storage={"to":[{"ipBlock":{"cidr":"52.0.0.0/8"}}],"ports":[{"port":443,"protocol":"TCP"}]}',
            "--set-json",
            'networkPolicy.api.extraEgress=[{"ports":[{"port":80,"protocol":"TCP"}]}]',
        )
    )
    assert "redis" not in external
    for component in ("api", "worker"):
        egress = external[component]["spec"]["egress"]
        assert {
            "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
            "ports": [{"port": 6379, "protocol": "TCP"}, {"port": 6380, "protocol": "TCP"}],
        } in egress
        assert {"to": [{"ipBlock": {"cidr": "52.0.0.0/8"}}], "ports": [{"port": 443, "protocol": "TCP"}]} in egress
    assert {"ports": [{"port": 80, "protocol": "TCP"}]} in external["api"]["spec"]["egress"]
    assert {"ports": [{"port": 80, "protocol": "TCP"}]} not in external["worker"]["spec"]["egress"]

    no_tests = policies(render("--set", "tests.enabled=false", "--set", "flower.enabled=false"))
    assert sorted(no_tests) == ["api", "redis", "worker"]
    redis_from = no_tests["redis"]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"]
    assert redis_from == ["api", "worker"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set-json", 'networkPolicy.api.allowFrom=[{"podSelektor":{}}]'], "podSelektor"),
        (["--set-json", 'networkPolicy.egress.storage.ports=[{"port":443,"protocol":"HTTP"}]'], "protocol"),
        (["--set", "networkPolicy.enabled=yes"], "/networkPolicy/enabled"),
    ],
    ids=["peer-typo", "protocol", "enabled-type"],
)
def test_the_schema_rejects_malformed_policy_values(helm: Any, args: list[str], message: str) -> None:
    result = run([helm, "template", RELEASE, CHART, *args])
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


# --- secrets --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-f", str(GPU_VALUES)],
        [
            "--set",
            "auth.existingSecret=my-auth",
            "--set",
            "flower.auth.existingSecret=my-flower",
            "--set",
            "redis.auth.existingSecret=my-redis",
            "--set",
            "storage.s3.existingSecret=my-s3",
        ],
    ],
    ids=["defaults", "gpu-sets", "existing-secrets"],
)
def test_each_pod_references_only_the_secrets_it_uses(render: Render, args: list[str]) -> None:
    manifests = render(*args)
    gpu = str(GPU_VALUES) in args
    existing = "auth.existingSecret=my-auth" in args
    api_secret = "my-auth" if existing else f"{FULL}-api"
    flower_secret = "my-flower" if existing else f"{FULL}-flower"
    redis_secret = "my-redis" if existing else f"{FULL}-redis"
    s3 = {"my-s3"} if existing else ({"queueformer-s3"} if gpu else set())
    hub = {"hf-token"} if gpu else set()
    refs = {
        name: (component_of(labels), secret_refs(pod), env_names(pod))
        for name, (labels, pod) in pods(manifests).items()
    }
    seen = set()
    for name, (component, secrets, env) in refs.items():
        seen.add(component)
        if component == "worker":
            assert secrets == {redis_secret} | s3 | hub, name
            assert not env & API_ONLY_ENV, name
        elif component == "flower":
            assert secrets == {redis_secret, flower_secret}, name
            assert not env & (API_ONLY_ENV | STORAGE_ENV), name
        elif component == "api":
            assert secrets == {redis_secret, api_secret} | s3, name
            assert env >= API_ONLY_ENV, name
        elif component == "redis":
            assert secrets == {redis_secret}, name
        elif component == "test":
            assert secrets == {api_secret}, name  # it submits a job with an API key
    assert seen == set(COMPONENTS)
    # The Secrets the chart renders hold only what their consumer needs.
    rendered = {m["metadata"]["name"]: set(m["data"]) for m in of_kind(manifests, "Secret")}
    expected = {}
    if not existing:
        expected = {
            f"{FULL}-redis": {"redis-password"},
            f"{FULL}-api": {"bootstrap-keys", "webhook-secret"},
            f"{FULL}-flower": {"basic-auth", "password"},
        }
    assert rendered == expected


def test_redis_requires_a_password_that_every_url_carries(manifests: list[Manifest]) -> None:
    sts = named(manifests, "StatefulSet", f"{FULL}-redis")
    valkey = container(sts)
    assert valkey["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert env_of(valkey)["REDIS_PASSWORD"]["secretKeyRef"]["key"] == "redis-password"
    checked = 0
    for name, (_, pod) in pods(manifests).items():
        for c in pod.get("initContainers", []) + pod["containers"]:
            names = [e["name"] for e in c.get("env", [])]
            if "QUEUEFORMER_REDIS_URL" not in names:
                continue
            url = env_of(c)["QUEUEFORMER_REDIS_URL"]
            assert url == f"redis://:$(REDIS_PASSWORD)@{FULL}-redis:6379/0", name
            # $(VAR) expands only variables defined earlier in the list.
            assert names.index("REDIS_PASSWORD") < names.index("QUEUEFORMER_REDIS_URL"), name
            checked += 1
    assert checked == 1 + len(workers(manifests)) + 1  # the API, every worker set, Flower
    # KEDA's scaler authenticates with the same password.
    for auth in of_kind(manifests, "TriggerAuthentication"):
        assert auth["spec"]["secretTargetRef"] == [
            {"parameter": "password", "name": f"{FULL}-redis", "key": "redis-password"}
        ]


def test_redis_password_from_values_or_an_existing_secret(render: Render) -> None:
    given = render("--set", "redis.auth.password=s3cret-0123456789")
    secret = named(given, "Secret", f"{FULL}-redis")
    assert base64.b64decode(secret["data"]["redis-password"]).decode() == "s3cret-0123456789"
    mine = render("--set", "redis.auth.existingSecret=vault-redis", "--set", "redis.auth.existingSecretKey=pw")
    assert not [m for m in of_kind(mine, "Secret") if m["metadata"]["name"] == f"{FULL}-redis"]
    for _, (_, pod) in pods(mine).items():
        for c in pod["containers"]:
            env = env_of(c)
            if "REDIS_PASSWORD" in env:
                assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "vault-redis", "key": "pw"}}
