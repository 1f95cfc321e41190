"""The Helm chart: `helm lint --strict` and assertions on what `helm template` renders.

Two value sets are checked throughout: the defaults (one CPU set on the tiny models, in-cluster Valkey,
file storage) and ci/gpu-sets-values.yaml (four sets, three of them on GPUs and autoscaled by KEDA,
S3 storage, ServiceMonitor/PodMonitor).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

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
GPU_SETS = yaml.safe_load(GPU_VALUES.read_text())["workers"]["sets"]
DEFAULT_SETS = yaml.safe_load((CHART / "values.yaml").read_text())["workers"]["sets"]
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PodMonitor"}


def pod_templates(manifests: list[Manifest]) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every workload and bare Pod."""
    out = []
    for m in manifests:
        if m["kind"] in ("Deployment", "StatefulSet"):
            out.append((f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"]["spec"]))
        elif m["kind"] == "Pod":
            out.append((f"Pod/{m['metadata']['name']}", m["spec"]))
    return out


def queue_args(deployment: Manifest) -> list[str]:
    args = container(deployment, "worker")["args"]
    start = args.index("--queues") + 1
    end = next((i for i in range(start, len(args)) if args[i].startswith("--")), len(args))
    return list(args[start:end])


def secret_data(manifests: list[Manifest], component: str) -> dict[str, str]:
    """The decoded data of the chart's own Secret for one consumer (`redis`, `api` or `flower`)."""
    secret = named(manifests, "Secret", f"{FULL}-{component}")
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


# --- lint ----------------------------------------------------------------------------------------


def test_helm_is_the_pinned_release(helm: Path) -> None:
    result = run([helm, "version", "--template", "{{.Version}}"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "v3.19.0"


@pytest.mark.parametrize("values", [None, GPU_VALUES], ids=["defaults", "gpu-sets"])
def test_helm_lint_strict_passes(helm: Path, values: Path | None) -> None:
    args = ["-f", str(values)] if values else []
    result = run([helm, "lint", "--strict", CHART, *args])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_notes_render(helm: Path, tmp_path: Path) -> None:
    """NOTES.txt goes through the same template engine (`helm template` itself never renders it)."""
    chart = tmp_path / "queueformer"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes-source.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  notes: {{ tpl (.Files.Get "notes-source.txt") . | quote }}\n'
    )
    for args in ([], ["-f", str(GPU_VALUES)]):
        result = run(
            [helm, "template", RELEASE, chart, "-n", NAMESPACE, "--show-only", "templates/zz-notes.yaml", *args]
        )
        assert result.returncode == 0, result.stderr
        notes = next(yaml.safe_load_all(result.stdout))["data"]["notes"]
        assert "helm test qf -n queueformer" in notes
        assert f"get secret {FULL}-api -o jsonpath='{{.data.bootstrap-keys}}'" in notes
        assert f"get secret {FULL}-flower -o jsonpath='{{.data.basic-auth}}'" in notes
        assert "NetworkPolicies" in notes
        assert f"{FULL}-worker-" in notes


# --- what gets rendered ----------------------------------------------------------------------------


def test_defaults_render_the_expected_objects(default_manifests: list[Manifest]) -> None:
    kinds = sorted({m["kind"] for m in default_manifests})
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "Pod",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    ]
    deployments = {m["metadata"]["name"] for m in of_kind(default_manifests, "Deployment")}
    assert deployments == {f"{FULL}-api", f"{FULL}-flower", f"{FULL}-worker-tiny"}
    for m in default_manifests:
        assert m["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, m["metadata"]["name"]


def test_one_worker_deployment_per_set_with_its_queues(
    default_manifests: list[Manifest], gpu_manifests: list[Manifest]
) -> None:
    for manifests, sets in ((default_manifests, DEFAULT_SETS), (gpu_manifests, GPU_SETS)):
        by_set = workers(manifests)
        assert sorted(by_set) == sorted(s["name"] for s in sets)
        for s in sets:
            deployment = by_set[s["name"]]
            assert deployment["metadata"]["name"] == f"{FULL}-worker-{s['name']}"
            assert queue_args(deployment) == s["queues"]
            args = container(deployment, "worker")["args"]
            assert args[:2] == ["queueformer", "worker"]
            assert args[args.index("--health-port") + 1] == "9100"
            selector = deployment["spec"]["selector"]["matchLabels"]
            assert selector["queueformer.io/worker-set"] == s["name"]
    assert len(workers(gpu_manifests)) == 4


def test_gpu_sets_get_gpu_limits_the_cuda_image_and_their_placement(gpu_manifests: list[Manifest]) -> None:
    by_set = workers(gpu_manifests)
    gpus = {}
    for s in GPU_SETS:
        pod = by_set[s["name"]]["spec"]["template"]["spec"]
        worker = container(by_set[s["name"]], "worker")
        limits = worker["resources"].get("limits", {})
        gpus[s["name"]] = limits.get("nvidia.com/gpu", 0)
        assert worker["resources"]["requests"], f"{s['name']}: no resource requests"
        if s["gpu"] > 0:
            assert worker["image"] == "ghcr.io/queueformer/queueformer-worker:0.1.0"
            assert pod["nodeSelector"] == s["nodeSelector"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in pod["volumes"])
        else:
            assert worker["image"] == "ghcr.io/queueformer/queueformer-worker-cpu:0.1.0"
            assert "tolerations" not in pod  # the set's `tolerations: []` replaced the GPU default
    assert gpus == {"generate-4bit": 1, "encoders": 1, "fine-tune": 1, "echo": 0}


def test_gpu_count_comes_from_the_set(render: Render) -> None:
    manifests = render("--set-json", 'workers.sets=[{"name":"big","queues":["tiny-gpt2"],"gpu":4}]')
    worker = container(workers(manifests)["big"], "worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert worker["resources"]["limits"]["memory"] == "8Gi"  # the defaults' limits are kept alongside


def test_keda_scaled_object_per_enabled_set(gpu_manifests: list[Manifest]) -> None:
    scaled = {m["spec"]["scaleTargetRef"]["name"]: m for m in of_kind(gpu_manifests, "ScaledObject")}
    enabled = [s for s in GPU_SETS if s.get("keda", {}).get("enabled", True)]
    assert sorted(scaled) == sorted(f"{FULL}-worker-{s['name']}" for s in enabled)
    auth = of_kind(gpu_manifests, "TriggerAuthentication")
    assert len(auth) == 1
    assert auth[0]["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": f"{FULL}-redis", "key": "redis-password"}
    ]
    by_set = workers(gpu_manifests)
    for s in enabled:
        obj = scaled[f"{FULL}-worker-{s['name']}"]
        spec = obj["spec"]
        redis_triggers = [t for t in spec["triggers"] if t["type"] == "redis"]
        assert [t["metadata"]["listName"] for t in redis_triggers] == s["queues"]
        for t in spec["triggers"]:
            # KEDA's trigger metadata is map[string]string: a number here is rejected by the operator.
            assert all(isinstance(v, str) for v in t["metadata"].values()), t
        for t in redis_triggers:
            assert t["metadata"]["address"] == f"{FULL}-redis.{NAMESPACE}.svc:6379"
            assert t["authenticationRef"]["name"] == auth[0]["metadata"]["name"]
        assert spec["minReplicaCount"] == s["keda"].get("minReplicaCount", 1)
        assert spec["cooldownPeriod"] >= 60
        policies = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policies"]
        assert policies == [{"type": "Pods", "value": 1, "periodSeconds": 60}]
        # The ScaledObject owns the replica count; a `replicas` in the Deployment would fight it on upgrades.
        assert "replicas" not in by_set[s["name"]]["spec"]
        assert any(t["type"] == "prometheus" for t in spec["triggers"])
    assert scaled[f"{FULL}-worker-generate-4bit"]["spec"]["minReplicaCount"] == 0  # scale to zero
    assert by_set["echo"]["spec"]["replicas"] == 1


def test_no_keda_objects_when_keda_is_off(default_manifests: list[Manifest], render: Render) -> None:
    assert not of_kind(default_manifests, "ScaledObject")
    off = render("-f", str(GPU_VALUES), "--set", "workers.defaults.keda.enabled=false")
    assert not of_kind(off, "ScaledObject") and not of_kind(off, "TriggerAuthentication")
    assert all("replicas" in d["spec"] for d in workers(off).values())


def test_workers_drain_before_they_stop(default_manifests: list[Manifest], gpu_manifests: list[Manifest]) -> None:
    grace = {s["name"]: s["terminationGracePeriodSeconds"] for s in GPU_SETS}
    checked = 0
    for manifests in (default_manifests, gpu_manifests):
        for name, deployment in workers(manifests).items():
            pod = deployment["spec"]["template"]["spec"]
            worker = container(deployment, "worker")
            command = worker["lifecycle"]["preStop"]["exec"]["command"]
            assert command[0] == "queueformer-drain"
            timeout = int(command[command.index("--timeout") + 1])
            assert 0 < timeout < pod["terminationGracePeriodSeconds"], name
            assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
            assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert worker["startupProbe"]["failureThreshold"] * worker["startupProbe"]["periodSeconds"] >= 120
            checked += 1
    assert checked == 5
    for name, deployment in workers(gpu_manifests).items():
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == grace[name]
    default_grace = workers(default_manifests)["tiny"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert default_grace == 600
    pdbs = {m["metadata"]["name"]: m["spec"] for m in of_kind(gpu_manifests, "PodDisruptionBudget")}
    for s in GPU_SETS:
        assert pdbs[f"{FULL}-worker-{s['name']}"]["maxUnavailable"] == 1
    assert pdbs[f"{FULL}-api"]["maxUnavailable"] == 1


def test_flower_requires_basic_auth_from_a_secret(default_manifests: list[Manifest], render: Render) -> None:
    flower = container(named(default_manifests, "Deployment", f"{FULL}-flower"))
    env = env_of(flower)
    assert env["FLOWER_BASIC_AUTH"] == {"secretKeyRef": {"name": f"{FULL}-flower", "key": "basic-auth"}}
    assert "FLOWER_UNAUTHENTICATED_API" not in env
    assert not any("unauthenticated" in a for a in flower["args"])
    assert env["CELERY_BROKER_URL"] == "$(QUEUEFORMER_REDIS_URL)"  # the URL never reaches the command line
    flower_secret = secret_data(default_manifests, "flower")
    user, _, password = flower_secret["basic-auth"].partition(":")
    assert user == "admin" and re.fullmatch(r"[A-Za-z0-9]{24}", password) and flower_secret["password"] == password

    mine = render("--set", "flower.auth.existingSecret=flower-creds")
    env = env_of(container(named(mine, "Deployment", f"{FULL}-flower")))
    assert env["FLOWER_BASIC_AUTH"] == {"secretKeyRef": {"name": "flower-creds", "key": "basic-auth"}}
    assert not [m for m in of_kind(mine, "Secret") if m["metadata"]["name"] == f"{FULL}-flower"]


def test_secrets_are_generated_never_defaulted(render: Render) -> None:
    renders = render(), render()
    first, second = (
        {k: v for component in ("redis", "api", "flower") for k, v in secret_data(m, component).items()}
        for m in renders
    )
    assert set(first) == {"redis-password", "bootstrap-keys", "webhook-secret", "password", "basic-auth"}
    for key in first:
        assert first[key] and first[key] != second[key], key
    assert re.fullmatch(r"[A-Za-z0-9]{32}", first["redis-password"])
    keys = json.loads(first["bootstrap-keys"])
    assert len(keys) == 1 and re.fullmatch(r"admin:qf-[A-Za-z0-9]{40}", keys[0])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["redis"]["auth"]["password"] == ""
    assert values["flower"]["auth"]["password"] == ""
    assert values["auth"]["bootstrapKeys"] == [] and values["auth"]["webhookSecret"] == ""


def test_checksum_annotations_roll_pods_on_config_and_secret_changes(render: Render) -> None:
    def checksums(manifests: list[Manifest]) -> dict[str, dict[str, str]]:
        out = {}
        for d in of_kind(manifests, "Deployment"):
            annotations = d["spec"]["template"]["metadata"]["annotations"]
            out[d["metadata"]["name"]] = {k: v for k, v in annotations.items() if k.startswith("checksum/")}
        return out

    base = checksums(render())
    assert base == checksums(render()), "checksums must not change between identical renders"
    for name in (f"{FULL}-api", f"{FULL}-worker-tiny"):
        assert set(base[name]) == {"checksum/config", "checksum/registry", "checksum/secret"}
        assert all(re.fullmatch(r"[0-9a-f]{64}", v) for v in base[name].values())
    logged = checksums(render("--set", "config.logLevel=DEBUG"))
    keyed = checksums(render("--set-json", 'auth.bootstrapKeys=["ops:0123456789abcdef0123"]'))
    for name in (f"{FULL}-api", f"{FULL}-worker-tiny"):
        assert logged[name]["checksum/config"] != base[name]["checksum/config"]
        assert logged[name]["checksum/secret"] == base[name]["checksum/secret"]
        assert keyed[name]["checksum/config"] == base[name]["checksum/config"]
    # New API keys roll the API, which reads them, and nothing else.
    assert keyed[f"{FULL}-api"]["checksum/secret"] != base[f"{FULL}-api"]["checksum/secret"]
    for name in (f"{FULL}-worker-tiny", f"{FULL}-flower"):
        assert keyed[name]["checksum/secret"] == base[name]["checksum/secret"], name
    # A Redis password given in values rolls every pod that connects to Redis.
    repassed = checksums(render("--set", "redis.auth.password=0123456789abcdef"))
    for name in (f"{FULL}-api", f"{FULL}-worker-tiny", f"{FULL}-flower"):
        assert repassed[name]["checksum/secret"] != base[name]["checksum/secret"], name
    gpu = checksums(render("-f", str(GPU_VALUES)))
    gpu_changed = checksums(
        render("-f", str(GPU_VALUES), "--set", "workers.sets[0].models.mistral-7b-nf4.max_batch_size=8")
    )
    assert gpu[f"{FULL}-worker-echo"]["checksum/registry"] != gpu_changed[f"{FULL}-worker-echo"]["checksum/registry"]


def test_in_cluster_redis_runs_with_aof_and_a_volume(default_manifests: list[Manifest]) -> None:
    conf = named(default_manifests, "ConfigMap", f"{FULL}-redis")["data"]["valkey.conf"]
    lines = {line.strip() for line in conf.splitlines()}
    assert {"appendonly yes", "appendfsync always", "maxmemory-policy noeviction", "dir /data"} <= lines
    sts = named(default_manifests, "StatefulSet", f"{FULL}-redis")
    valkey = container(sts)
    assert valkey["args"] == ["/etc/valkey/valkey.conf", "--requirepass", "$(REDIS_PASSWORD)"]
    assert env_of(valkey)["REDIS_PASSWORD"] == {"secretKeyRef": {"name": f"{FULL}-redis", "key": "redis-password"}}
    assert {"name": "data", "mountPath": "/data"} in valkey["volumeMounts"]
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 999
    # Every queueformer process reaches it with the generated password, assembled in the pod.
    for name, deployment in workers(default_manifests).items():
        env = env_of(container(deployment, "worker"))
        assert env["QUEUEFORMER_REDIS_URL"] == f"redis://:$(REDIS_PASSWORD)@{FULL}-redis:6379/0", name


def test_external_redis_from_a_secret(render: Render) -> None:
    manifests = render("--set", "redis.enabled=false", "--set", "externalRedis.existingSecret=my-redis")
    assert not of_kind(manifests, "StatefulSet")
    assert all(m["metadata"]["name"] != f"{FULL}-redis" for m in manifests)
    for deployment in of_kind(manifests, "Deployment"):
        env = env_of(container(deployment))
        assert env["QUEUEFORMER_REDIS_URL"] == {"secretKeyRef": {"name": "my-redis", "key": "redis-url"}}
        assert "REDIS_PASSWORD" not in env
    assert not [m for m in of_kind(manifests, "Secret") if m["metadata"]["name"] == f"{FULL}-redis"]

    keda = render(
        "-f",
        str(GPU_VALUES),
        "--set",
        "redis.enabled=false",
        "--set",
        "externalRedis.existingSecret=my-redis",
        "--set",
        "keda.redisAddress=redis.example.internal:6380",
        "--set",
        "keda.passwordSecret.name=my-redis",
    )
    auth = of_kind(keda, "TriggerAuthentication")[0]
    assert auth["spec"]["secretTargetRef"][0] == {"parameter": "password", "name": "my-redis", "key": "redis-password"}
    addresses = {
        t["metadata"]["address"]
        for so in of_kind(keda, "ScaledObject")
        for t in so["spec"]["triggers"]
        if t["type"] == "redis"
    }
    assert addresses == {"redis.example.internal:6380"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "redis.enabled=false"], "externalRedis.existingSecret"),
        (
            ["-f", str(GPU_VALUES), "--set", "redis.enabled=false", "--set", "externalRedis.existingSecret=r"],
            "keda.redisAddress",
        ),
        (["--set-json", 'workers.sets=[{"name":"a","queues":["echo"]},{"name":"a","queues":["echo"]}]'], "used twice"),
        (["-f", str(GPU_VALUES), "--set", "workers.sets[3].queues[0]=nope"], 'queue "nope" is not in the registry'),
        (
            [
                "--set-json",
                'registry.models={"m":{"task":"echo"}}',
                "--set-json",
                'workers.sets=[{"name":"a","queues":["m"],"models":{"m":{"task":"echo"}}}]',
            ],
            'model "m" is defined twice',
        ),
    ],
    ids=["no-redis", "keda-external-no-address", "duplicate-set", "unknown-queue", "duplicate-model"],
)
def test_inconsistent_values_fail_with_a_message(helm: Path, args: list[str], message: str) -> None:
    result = run([helm, "template", RELEASE, CHART, *args])
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_registry_configmap_is_a_valid_registry_serving_every_set(gpu_manifests: list[Manifest]) -> None:
    from queueformer.contract.registry import Registry

    text = named(gpu_manifests, "ConfigMap", f"{FULL}-registry")["data"]["registry.yaml"]
    registry = Registry.from_yaml(text, origin="rendered registry")
    queues = set(registry.queues())
    for s in GPU_SETS:
        assert set(s["queues"]) <= queues, s["name"]
    assert registry.get("mistral-7b-nf4").quantization.value == "nf4"
    assert registry.get("distilbert-sst2").quantization.value == "int8"
    assert registry.fine_tune.bases == ["mistral-7b-nf4"]
    config = named(gpu_manifests, "ConfigMap", FULL)["data"]
    assert config["QUEUEFORMER_REGISTRY"] == "/etc/queueformer/registry.yaml"
    for deployment in of_kind(gpu_manifests, "Deployment"):
        if deployment["metadata"]["name"].endswith("-flower"):
            continue
        mounts = {m["name"]: m["mountPath"] for m in container(deployment)["volumeMounts"]}
        assert mounts["registry"] == "/etc/queueformer", deployment["metadata"]["name"]


def test_default_set_serves_queues_of_the_bundled_registry(default_manifests: list[Manifest]) -> None:
    from queueformer.contract.registry import Registry

    config = named(default_manifests, "ConfigMap", FULL)["data"]
    assert config["QUEUEFORMER_REGISTRY"] == "tiny"
    assert not [m for m in default_manifests if m["metadata"]["name"] == f"{FULL}-registry"]
    known = set(Registry.load("tiny").queues())
    tiny = workers(default_manifests)["tiny"]
    assert set(queue_args(tiny)) == known  # the default set serves every queue of the tiny registry
    init = tiny["spec"]["template"]["spec"]["initContainers"][0]
    assert init["args"] == ["queueformer", "models", "build-tiny", config["QUEUEFORMER_MODELS_DIR"]]


def test_storage_is_a_shared_claim_or_s3(default_manifests: list[Manifest], gpu_manifests: list[Manifest]) -> None:
    claim = named(default_manifests, "PersistentVolumeClaim", f"{FULL}-storage")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for deployment in (named(default_manifests, "Deployment", f"{FULL}-api"), workers(default_manifests)["tiny"]):
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["storage"]["persistentVolumeClaim"]["claimName"] == f"{FULL}-storage"
        assert {"name": "storage", "mountPath": "/data/storage"} in container(deployment)["volumeMounts"]
    assert named(default_manifests, "ConfigMap", FULL)["data"]["QUEUEFORMER_STORAGE_URL"] == "file:///data/storage"

    config = named(gpu_manifests, "ConfigMap", FULL)["data"]
    assert config["QUEUEFORMER_STORAGE_URL"] == "s3://queueformer-prod/storage"
    assert json.loads(config["QUEUEFORMER_STORAGE_OPTIONS"]) == {"client_kwargs": {"region_name": "eu-west-1"}}
    claims = {m["metadata"]["name"] for m in of_kind(gpu_manifests, "PersistentVolumeClaim")}
    assert claims == {f"{FULL}-models"}
    models = named(gpu_manifests, "PersistentVolumeClaim", f"{FULL}-models")
    assert models["spec"]["accessModes"] == ["ReadWriteMany"]
    for deployment in workers(gpu_manifests).values():
        env = env_of(container(deployment, "worker"))
        assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "queueformer-s3", "key": "aws-access-key-id"}}
        assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "hf-token"}}
        assert "storage" not in {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}


def test_pods_run_unprivileged_with_resource_requests(
    default_manifests: list[Manifest], gpu_manifests: list[Manifest]
) -> None:
    checked = 0
    for manifests in (default_manifests, gpu_manifests):
        for name, pod in pod_templates(manifests):
            security = pod["securityContext"]
            assert security["runAsNonRoot"] is True, name
            assert isinstance(security["runAsUser"], int) and security["runAsUser"] > 0, name
            assert pod["automountServiceAccountToken"] is False, name
            for c in pod.get("initContainers", []) + pod["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, (name, c["name"])
                assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], (name, c["name"])
                assert c["resources"]["requests"], (name, c["name"])
                checked += 1
    assert checked >= 12


def test_api_deployment_service_ingress_and_hpa(
    default_manifests: list[Manifest], gpu_manifests: list[Manifest]
) -> None:
    api = named(default_manifests, "Deployment", f"{FULL}-api")
    c = container(api)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["args"][:3] == ["uvicorn", "api.app:create_app", "--factory"]
    assert env_of(c)["QUEUEFORMER_API__BOOTSTRAP_KEYS"] == {
        "secretKeyRef": {"name": f"{FULL}-api", "key": "bootstrap-keys"}
    }
    assert named(default_manifests, "ConfigMap", FULL)["data"]["QUEUEFORMER_API__AUTH_REQUIRED"] == "true"
    assert api["spec"]["replicas"] == 1
    service = named(default_manifests, "Service", f"{FULL}-api")
    assert service["spec"]["ports"][0]["port"] == 8000

    gpu_api = named(gpu_manifests, "Deployment", f"{FULL}-api")
    assert "replicas" not in gpu_api["spec"]  # the HPA owns it
    hpa = named(gpu_manifests, "HorizontalPodAutoscaler", f"{FULL}-api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{FULL}-api"
    ingress = named(gpu_manifests, "Ingress", f"{FULL}-api")
    paths = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert paths == ["/v1", "/docs", "/openapi.json"]  # /metrics stays inside the cluster


def test_metrics_scrape_annotations_and_monitors(
    default_manifests: list[Manifest], gpu_manifests: list[Manifest]
) -> None:
    for deployment in [named(default_manifests, "Deployment", f"{FULL}-api"), *workers(default_manifests).values()]:
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
    assert not of_kind(default_manifests, "ServiceMonitor") and not of_kind(default_manifests, "PodMonitor")
    monitor = of_kind(gpu_manifests, "ServiceMonitor")[0]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pods = of_kind(gpu_manifests, "PodMonitor")[0]["spec"]
    assert pods["selector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_queueformer_io_worker_set"], "targetLabel": "worker_set"} in (
        pods["podMetricsEndpoints"][0]["relabelings"]
    )


def test_helm_test_hook_submits_an_echo_job(
    default_manifests: list[Manifest], gpu_manifests: list[Manifest], render: Render
) -> None:
    for manifests in (default_manifests, gpu_manifests):
        pod = named(manifests, "Pod", f"{FULL}-test-echo")
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        c = container({"spec": {"template": {"spec": pod["spec"]}}})
        script = c["command"][-1]
        compile(script, "test-echo", "exec")  # the inline script is valid Python
        assert '"/v1/jobs"' in script and '"succeeded"' in script and '"/readyz"' in script
        env = env_of(c)
        assert env["SUBMIT_ECHO"] == "1"
        assert env["API_URL"] == f"http://{FULL}-api:8000"
        assert env["BOOTSTRAP_KEYS"] == {"secretKeyRef": {"name": f"{FULL}-api", "key": "bootstrap-keys"}}
    no_echo = render("--set-json", 'workers.sets=[{"name":"gen","queues":["tiny-gpt2"]}]')
    env = env_of(container({"spec": {"template": {"spec": named(no_echo, "Pod", f"{FULL}-test-echo")["spec"]}}}))
    assert env["SUBMIT_ECHO"] == "0"


def test_crd_objects_are_only_rendered_when_asked_for(default_manifests: list[Manifest]) -> None:
    assert not [m for m in default_manifests if m["kind"] in CRD_KINDS]
