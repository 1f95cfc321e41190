"""Dockerfiles (hadolint and what they promise), the compose file (docker compose config) and the scripts
the images and compose use (entrypoint, drain hook, secret generator). No Docker engine is needed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import DOCKER, ROOT, run

DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
COMPOSE = DOCKER / "compose.yaml"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


# --- Dockerfiles ---------------------------------------------------------------------------------


def test_the_three_images_are_there() -> None:
    assert [p.name for p in DOCKERFILES] == ["api.Dockerfile", "worker-cpu.Dockerfile", "worker.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes_at_warning_threshold(hadolint: Path, dockerfile: Path) -> None:
    result = run([hadolint, "--failure-threshold", "warning", "--no-color", dockerfile])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(hadolint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    result = run([hadolint, "--failure-threshold", "warning", "--no-color", bad])
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3002"):  # latest tag, unpinned apt, root user
        assert rule in result.stdout, result.stdout


def test_hadolint_scans_the_real_files(hadolint: Path) -> None:
    """The checks above would also pass on empty files: prove hadolint reads these ones."""
    result = run([hadolint, "--no-color", "--format", "json", "--failure-threshold", "none", *DOCKERFILES])
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)
    assert all(len(instructions(p)) > 15 for p in DOCKERFILES)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_a_numeric_user_with_a_healthcheck(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    users = [args for word, args in steps if word == "USER"]
    assert users and all(re.fullmatch(r"10001:10001", u) for u in users), users
    assert any(word == "HEALTHCHECK" for word, _ in steps)
    assert any(word == "ENTRYPOINT" and "queueformer-entrypoint" in args for word, args in steps)
    assert re.search(r"groupadd --system --gid \"\$\{UID\}\"", dockerfile.read_text())
    # No secret is baked in: no ENV or ARG sets anything that looks like one.
    for word, args in steps:
        if word in ("ENV", "ARG"):
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|BOOTSTRAP_KEYS|REDIS_URL)\S*=", args), args


def test_api_image_has_no_torch_and_runs_uvicorn() -> None:
    text = (DOCKER / "api.Dockerfile").read_text()
    code = " ".join(args for _, args in instructions(DOCKER / "api.Dockerfile"))
    assert "torch" not in code and "./[api]" in code and "[worker]" not in code
    assert "COPY workers" not in text
    stages = [args for word, args in instructions(DOCKER / "api.Dockerfile") if word == "FROM"]
    assert stages[-1].endswith(" AS api") and any(s.endswith(" AS flower") for s in stages)
    assert '"flower==${FLOWER_VERSION}"' in text
    cmd = [args for word, args in final_stage(DOCKER / "api.Dockerfile") if word == "CMD"][-1]
    assert json.loads(cmd)[:3] == ["uvicorn", "api.app:create_app", "--factory"]


def test_worker_images_install_torch_from_the_right_index() -> None:
    cpu = (DOCKER / "worker-cpu.Dockerfile").read_text()
    assert (
        'pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu' in cpu
    )
    assert cpu.index("download.pytorch.org/whl/cpu") < cpu.index("./[worker]")
    cuda = (DOCKER / "worker.Dockerfile").read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu", cuda)
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128" in cuda
    assert cuda.index("${TORCH_INDEX_URL}") < cuda.index("./[worker]")
    for text in (cpu, cuda):
        assert "HF_HOME=/models/cache" in text and 'VOLUME ["/models"]' in text
        assert "QUEUEFORMER_WORKER__HEALTH_PORT=9100" in text
        assert "COPY --chmod=0755 docker/drain.py /usr/local/bin/queueformer-drain" in text


def test_dockerignore_keeps_secrets_and_caches_out_of_build_contexts() -> None:
    lines = [x for x in (ROOT / ".dockerignore").read_text().splitlines() if x and not x.startswith("#")]
    assert lines[0] == "*"  # an allowlist
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "README.md",
        "queueformer",
        "api",
        "workers",
        "docker/entrypoint.sh",
        "docker/drain.py",
    }
    copied = set()
    for dockerfile in DOCKERFILES:
        for word, args in instructions(dockerfile):
            if word == "COPY" and "--from" not in args:
                copied.update(a.rstrip("/") for a in args.split()[:-1] if not a.startswith("--"))
    assert copied <= allowed, copied - allowed


# --- compose -------------------------------------------------------------------------------------


def compose_config(docker_compose: Path, *extra: str) -> dict[str, Any]:
    result = run([docker_compose, "-f", COMPOSE, *extra, "config", "--format", "json"])
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def test_compose_config_is_valid(docker_compose: Path) -> None:
    for extra in ([], ["--env-file", str(DOCKER / "s3.env")]):
        result = run([docker_compose, "-f", COMPOSE, *extra, "config", "-q"])
        assert result.returncode == 0, result.stderr


def test_compose_config_catches_a_broken_file(docker_compose: Path, tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    text = COMPOSE.read_text().replace("      - queueformer_redis_url\n", "      - no_such_secret\n", 1)
    broken.write_text(text)
    result = run([docker_compose, "-f", broken, "config", "-q"])
    assert result.returncode != 0
    assert "no_such_secret" in result.stderr
    typo = tmp_path / "typo.yaml"
    typo.write_text(COMPOSE.read_text().replace("stop_grace_period: 10m", "stop_grace_period: [10m]"))
    assert run([docker_compose, "-f", typo, "config", "-q"]).returncode != 0


def test_compose_services_and_their_wiring(docker_compose: Path) -> None:
    services = compose_config(docker_compose)["services"]
    assert sorted(services) == ["api", "flower", "models-init", "redis", "worker"]

    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync always" in command
    assert "--maxmemory-policy noeviction" in command
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])

    init = services["models-init"]
    assert init["command"] == ["queueformer", "models", "build-tiny", "/models/tiny"]
    worker = services["worker"]
    assert worker["depends_on"]["models-init"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["environment"]["QUEUEFORMER_MODELS_DIR"] == "/models/tiny"
    assert worker["environment"]["HF_HOME"] == "/models/cache"
    args = worker["command"]
    queues = args[args.index("--queues") + 1 : args.index("--health-port")]
    from queueformer.contract.registry import Registry

    assert set(queues) == set(Registry.load("tiny").queues())
    assert worker["stop_grace_period"] == "10m0s"

    for name in ("api", "worker", "models-init", "flower", "redis"):
        assert services[name]["read_only"] is True, name
        assert services[name]["cap_drop"] == ["ALL"], name
    assert services["api"]["environment"]["QUEUEFORMER_API__AUTH_REQUIRED"] == "true"
    for name in ("api", "flower"):
        for port in services[name]["ports"]:
            assert port["host_ip"] == "127.0.0.1", (name, port)


def test_compose_secrets_come_from_files_never_literals(docker_compose: Path) -> None:
    config = compose_config(docker_compose)
    services = config["services"]
    flower = services["flower"]
    assert {s["source"] for s in flower["secrets"]} == {"queueformer_redis_url", "flower_basic_auth"}
    assert "FLOWER_BASIC_AUTH" not in (flower.get("environment") or {})
    assert "FLOWER_UNAUTHENTICATED_API" not in json.dumps(config)
    assert {s["source"] for s in services["api"]["secrets"]} >= {
        "queueformer_redis_url",
        "queueformer_api__bootstrap_keys",
    }
    assert all(Path(s["file"]).parent == DOCKER / "secrets" for s in config["secrets"].values())
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            assert not re.search(r"PASSWORD|SECRET|BASIC_AUTH|REDIS_URL|ACCESS_KEY", key) or key.endswith("_FILE"), (
                name,
                key,
            )
            assert value is None or "redis://" not in value, (name, key)


def test_compose_services_get_only_the_secrets_they_use(docker_compose: Path) -> None:
    for extra in ([], ["--env-file", str(DOCKER / "s3.env")]):
        services = compose_config(docker_compose, *extra)["services"]
        mounted = {name: {s["source"] for s in service.get("secrets", [])} for name, service in services.items()}
        s3 = {"aws_access_key_id", "aws_secret_access_key"}
        expected = {
            "redis": {"redis_password"},
            "api": {"queueformer_redis_url", "queueformer_api__bootstrap_keys", "queueformer_api__webhook_secret"} | s3,
            "worker": {"queueformer_redis_url"} | s3,
            "flower": {"queueformer_redis_url", "flower_basic_auth"},
            "models-init": set(),
        }
        if extra:
            expected |= {"minio": s3, "minio-init": s3}
        assert mounted == expected


def test_compose_redis_requires_its_password_and_fsyncs_every_write(docker_compose: Path) -> None:
    redis = compose_config(docker_compose)["services"]["redis"]
    command = " ".join(redis["command"])
    assert '--requirepass "$$(cat /run/secrets/redis_password)"' in command  # $$: compose's escape
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])
    # The comment above the command says what it does.
    text = COMPOSE.read_text()
    comment = text[text.index("  redis:\n") : text.index("    command:", text.index("  redis:\n"))]
    assert "--appendfsync always" in command
    assert "every write" in comment and "every second" not in comment


def test_compose_s3_profile_adds_minio_and_switches_storage(docker_compose: Path) -> None:
    services = compose_config(docker_compose, "--env-file", str(DOCKER / "s3.env"))["services"]
    assert {"minio", "minio-init"} <= set(services)
    env = services["api"]["environment"]
    assert env["QUEUEFORMER_STORAGE_URL"] == "s3://queueformer/storage"
    options = json.loads(env["QUEUEFORMER_STORAGE_OPTIONS"])
    assert options["client_kwargs"]["endpoint_url"] == "http://minio:9000"
    assert services["minio"]["environment"]["MINIO_ROOT_PASSWORD_FILE"] == "/run/secrets/aws_secret_access_key"
    default = compose_config(docker_compose)["services"]["api"]["environment"]
    assert default["QUEUEFORMER_STORAGE_URL"] == "file:///data/storage"
    assert json.loads(default["QUEUEFORMER_STORAGE_OPTIONS"]) == {}


# --- scripts -------------------------------------------------------------------------------------


def test_make_secrets_writes_random_consistent_files_once(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        result = run(["sh", DOCKER / "make-secrets.sh", d], timeout=30)
        assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(one.stat().st_mode) == 0o700
    names = {p.name for p in one.iterdir()}
    assert names == {
        "redis_password",
        "queueformer_redis_url",
        "queueformer_api__bootstrap_keys",
        "queueformer_api__webhook_secret",
        "flower_basic_auth",
        "aws_access_key_id",
        "aws_secret_access_key",
    }
    # Every secret the compose file mounts is one of them.
    compose_secrets = set(re.findall(r"file: \./secrets/(\w+)", COMPOSE.read_text()))
    assert compose_secrets == names
    read = {p.name: p.read_text() for p in one.iterdir()}
    assert read["queueformer_redis_url"] == f"redis://:{read['redis_password']}@redis:6379/0"
    assert re.fullmatch(r'\["admin:qf-[A-Za-z0-9]{40}"\]', read["queueformer_api__bootstrap_keys"])
    assert re.fullmatch(r"admin:[A-Za-z0-9]{24}", read["flower_basic_auth"])
    for p in one.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644  # readable by the containers' users
        if p.name != "aws_access_key_id":
            assert p.read_text() != (two / p.name).read_text(), p.name
    again = run(["sh", DOCKER / "make-secrets.sh", one], timeout=30)
    assert again.returncode == 0 and "created" not in again.stdout
    assert {p.name: p.read_text() for p in one.iterdir()} == read


def test_entrypoint_exports_secret_files_and_keeps_explicit_env(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "queueformer_redis_url").write_text("redis://:pw@redis:6379/0\n")
    (secrets / "queueformer_api__bootstrap_keys").write_text('["admin:k"]')
    (secrets / "flower_basic_auth").write_text("admin:from-file")
    (secrets / "aws_secret_access_key").write_text("s3cr3t")
    (secrets / "unrelated").write_text("x")
    (secrets / "queueformer-not-a-name").write_text("x")
    env = {"PATH": os.environ["PATH"], "QUEUEFORMER_SECRETS_DIR": str(secrets), "FLOWER_BASIC_AUTH": "admin:env"}
    result = subprocess.run(
        [
            "sh",
            str(DOCKER / "entrypoint.sh"),
            sys.executable,
            "-c",
            "import json, os; print(json.dumps(dict(os.environ)))",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["QUEUEFORMER_REDIS_URL"] == "redis://:pw@redis:6379/0"  # trailing newline dropped
    assert seen["QUEUEFORMER_API__BOOTSTRAP_KEYS"] == '["admin:k"]'
    assert seen["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert seen["FLOWER_BASIC_AUTH"] == "admin:env"  # the environment wins over the file
    assert seen["CELERY_BROKER_URL"] == "redis://:pw@redis:6379/0"
    assert "UNRELATED" not in seen


class _FakeWorkerMetrics:
    """A worker's /metrics on loopback: N messages in flight until the worker got SIGTERM, then 0."""

    def __init__(self, marker: Path, stuck: bool = False) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                busy = 1 if fake.stuck or not marker.exists() else 0
                body = f"queueformer_worker_messages_in_flight {busy}.0\n"
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, format: str, *args: object) -> None:
                return

        self.stuck = stuck
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_worker(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A process that, like a Celery worker in warm shutdown, notes SIGTERM and keeps running."""
    marker = tmp_path / "got-sigterm"
    code = (
        "import pathlib, signal, time\n"
        f"signal.signal(signal.SIGTERM, lambda *_: pathlib.Path({str(marker)!r}).write_text('1'))\n"
        "time.sleep(60)\n"
    )
    with (tmp_path / "worker.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log)
    time.sleep(0.5)  # let it install the handler
    try:
        yield proc, marker
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def _drain(*args: str | int) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(DOCKER / "drain.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_drain_hook_signals_the_worker_and_waits_for_in_flight_work(
    fake_worker: tuple[subprocess.Popen[bytes], Path],
) -> None:
    proc, marker = fake_worker
    metrics = _FakeWorkerMetrics(marker)
    try:
        started = time.monotonic()
        result = _drain("--pid", proc.pid, "--port", metrics.port, "--interval", "0.1", "--timeout", "30")
    finally:
        metrics.close()
    assert result.returncode == 0, result.stderr
    assert marker.exists(), "the worker never got SIGTERM"
    # The hook reports on the worker's own stdout, which is what `kubectl logs` shows.
    log = (marker.parent / "worker.log").read_text()
    assert "sending SIGTERM" in log and "nothing in flight" in log, log
    assert time.monotonic() - started < 20
    assert proc.poll() is None  # the hook stops waiting; the worker exits on its own


def test_drain_hook_gives_up_after_its_timeout(fake_worker: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, marker = fake_worker
    metrics = _FakeWorkerMetrics(marker, stuck=True)
    try:
        started = time.monotonic()
        result = _drain("--pid", proc.pid, "--port", metrics.port, "--interval", "0.1", "--timeout", "1")
    finally:
        metrics.close()
    assert result.returncode == 0
    assert 1 <= time.monotonic() - started < 15
    assert "still in flight after 1s; leaving them to SIGKILL" in (marker.parent / "worker.log").read_text()
